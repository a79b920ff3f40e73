"""The controller: API, scheduler, migrator, over a store, talking to host agents."""
