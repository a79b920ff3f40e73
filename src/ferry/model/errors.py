"""Errors a user can cause. Each carries a one-line message naming the problem."""


class FerryError(Exception):
    """Base of the errors ferry reports to users; `status` is the HTTP status to use."""

    status = 400


class InvalidInput(FerryError):
    status = 422


class NotFound(FerryError):
    status = 404


class Conflict(FerryError):
    status = 409


class NoCapacity(FerryError):
    status = 409
