/*
 * memload: a memory-verifying load generator for ferry guests.
 *
 *   memload SIZE_MIB RATE_MIB_S [STATUS_FILE]
 *
 * Fills SIZE MiB with a pattern that is a pure function of (page index,
 * page generation) and then rewrites it at RATE MiB/s.  Before a page is
 * rewritten its whole content is checked against the pattern it must hold,
 * so any page that a live migration loses or corrupts is reported:
 *
 *   MEMLOAD ERROR page=<i> gen=<g> word=<w> expected=<x> got=<y>
 *
 * RATE 0 fills once and then only re-verifies everything every few seconds
 * (no writes), which checks an idle guest.
 *
 * Status goes to STATUS_FILE (default /run/memload.status) as one JSON
 * object, replaced atomically (tmp + rename) about once per second.
 *
 * MEMLOAD_SELFTEST_CORRUPT=1 in the environment flips one word once after
 * the first full pass, so tests can prove that corruption is detected.
 *
 * Built with gcc -O2 -static -fno-tree-vectorize: plain 64-bit scalar loops
 * are what QEMU TCG translates fastest (SSE goes through helpers).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define PAGE_BYTES 4096u
#define PAGE_WORDS (PAGE_BYTES / 8u)
#define CHUNK_PAGES 256u /* 1 MiB: granularity of rate limiting and clock checks */
#define WORD_STEP 0x9E3779B97F4A7C15ull
#define MAX_ERROR_LINES 64
#define IDLE_VERIFY_PERIOD_S 3.0

static uint64_t *mem;
static uint32_t *gens;
static uint64_t npages;
static uint64_t size_mib, rate_mib_s;
static const char *status_path = "/run/memload.status";

static uint64_t verified_pages, errors, passes, written_pages;
static uint64_t error_lines;

/* splitmix64 finaliser: every (index, gen) gets an unrelated 64-bit seed. */
static inline uint64_t mix(uint64_t index, uint64_t gen)
{
	uint64_t z = (index << 32) ^ gen ^ 0x5851F42D4C957F2Dull;
	z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
	z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
	return z ^ (z >> 31);
}

static double now_s(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void sleep_s(double s)
{
	struct timespec ts;
	if (s <= 0)
		return;
	ts.tv_sec = (time_t)s;
	ts.tv_nsec = (long)((s - (double)ts.tv_sec) * 1e9);
	while (nanosleep(&ts, &ts) == -1 && errno == EINTR)
		;
}

/* word w of a page = mix(index, gen) + w * WORD_STEP */
static inline void fill_page(uint64_t *p, uint64_t index, uint64_t gen)
{
	uint64_t v = mix(index, gen);
	for (unsigned w = 0; w < PAGE_WORDS; w += 4) {
		p[w] = v;
		p[w + 1] = v + WORD_STEP;
		p[w + 2] = v + 2 * WORD_STEP;
		p[w + 3] = v + 3 * WORD_STEP;
		v += 4 * WORD_STEP;
	}
}

/* Fast branch-free check; returns nonzero if any word differs. */
static inline uint64_t page_differs(const uint64_t *p, uint64_t index, uint64_t gen)
{
	uint64_t v = mix(index, gen), diff = 0;
	for (unsigned w = 0; w < PAGE_WORDS; w += 4) {
		diff |= p[w] ^ v;
		diff |= p[w + 1] ^ (v + WORD_STEP);
		diff |= p[w + 2] ^ (v + 2 * WORD_STEP);
		diff |= p[w + 3] ^ (v + 3 * WORD_STEP);
		v += 4 * WORD_STEP;
	}
	return diff;
}

/* Slow path: report the first bad word, count the page as one error. */
static void report(const uint64_t *p, uint64_t index, uint64_t gen)
{
	uint64_t v = mix(index, gen);
	unsigned bad_words = 0, first = PAGE_WORDS;
	for (unsigned w = 0; w < PAGE_WORDS; w++, v += WORD_STEP) {
		if (p[w] != v) {
			if (first == PAGE_WORDS)
				first = w;
			bad_words++;
		}
	}
	errors++;
	if (error_lines < MAX_ERROR_LINES) {
		uint64_t exp = mix(index, gen) + (uint64_t)first * WORD_STEP;
		fprintf(stderr,
			"MEMLOAD ERROR page=%" PRIu64 " gen=%" PRIu64 " word=%u expected=0x%016" PRIx64
			" got=0x%016" PRIx64 " bad_words=%u\n",
			index, gen, first, exp, p[first], bad_words);
	} else if (error_lines == MAX_ERROR_LINES) {
		fprintf(stderr, "MEMLOAD ERROR further error lines suppressed; see errors in %s\n",
			status_path);
	}
	error_lines++;
}

static void write_status(double achieved)
{
	char tmp[4096], buf[512];
	int n = snprintf(buf, sizeof buf,
			 "{\"size_mib\":%" PRIu64 ",\"rate_mib_s\":%" PRIu64 ",\"verified_pages\":%" PRIu64
			 ",\"errors\":%" PRIu64 ",\"passes\":%" PRIu64 ",\"written_mib\":%" PRIu64
			 ",\"achieved_rate_mib_s\":%.1f}\n",
			 size_mib, rate_mib_s, verified_pages, errors, passes,
			 written_pages / 256u, achieved);
	snprintf(tmp, sizeof tmp, "%s.tmp", status_path);
	FILE *f = fopen(tmp, "w");
	if (!f)
		return;
	fwrite(buf, 1, (size_t)n, f);
	/* a reader must never see a half-written file: write tmp, then rename */
	if (fclose(f) == 0)
		rename(tmp, status_path);
}

/* Called after every chunk: emits status about once per second. */
static double last_status_t, last_status_written;
static void maybe_status(double t, int force)
{
	if (!force && t - last_status_t < 1.0)
		return;
	double dt = t - last_status_t;
	double mib = (double)(written_pages - last_status_written) / 256.0;
	write_status(dt > 0 ? mib / dt : 0.0);
	last_status_t = t;
	last_status_written = written_pages;
}

int main(int argc, char **argv)
{
	if (argc < 3 || argc > 4) {
		fprintf(stderr, "usage: memload SIZE_MIB RATE_MIB_S [STATUS_FILE]\n");
		return 2;
	}
	size_mib = strtoull(argv[1], NULL, 10);
	rate_mib_s = strtoull(argv[2], NULL, 10);
	if (argc == 4)
		status_path = argv[3];
	if (size_mib == 0) {
		fprintf(stderr, "memload: SIZE_MIB must be > 0\n");
		return 2;
	}
	const char *st = getenv("MEMLOAD_SELFTEST_CORRUPT");
	int selftest = st && *st && strcmp(st, "0") != 0;

	npages = size_mib * 256u;
	setvbuf(stdout, NULL, _IOLBF, 0);
	printf("MEMLOAD START size=%" PRIu64 " rate=%" PRIu64 "\n", size_mib, rate_mib_s);

	/* pin memory if allowed so the guest never swaps our pages (there is no
	 * swap in the ferry guest, but a host run may have some) */
	if (mlockall(MCL_CURRENT | MCL_FUTURE) != 0)
		fprintf(stderr, "memload: mlockall failed (%s), continuing\n", strerror(errno));

	mem = mmap(NULL, npages * PAGE_BYTES, PROT_READ | PROT_WRITE,
		   MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
	gens = calloc(npages, sizeof *gens);
	if (mem == MAP_FAILED || !gens) {
		fprintf(stderr, "memload: cannot allocate %" PRIu64 " MiB\n", size_mib);
		return 1;
	}

	/* Status exists from the start: init waits for it before declaring ready. */
	write_status(0.0);

	/* Initial fill (touches every page) at full speed, generation 0. */
	double t0 = now_s();
	for (uint64_t i = 0; i < npages; i++)
		fill_page(mem + i * PAGE_WORDS, i, 0);
	last_status_t = now_s();
	printf("MEMLOAD FILLED size=%" PRIu64 " seconds=%.2f\n", size_mib, last_status_t - t0);
	write_status(0.0);

	int corrupted = 0;
	uint64_t page = 0;
	double sched_t0 = now_s();      /* start of the rate schedule */
	uint64_t sched_pages = 0;       /* pages written since sched_t0 */
	const double pages_per_s = (double)rate_mib_s * 256.0;

	for (;;) {
		uint64_t end = page + CHUNK_PAGES;
		if (end > npages)
			end = npages;
		for (uint64_t i = page; i < end; i++) {
			uint64_t *p = mem + i * PAGE_WORDS;
			uint64_t g = gens[i];
			if (page_differs(p, i, g)) {
				report(p, i, g);
				if (rate_mib_s == 0)
					fill_page(p, i, g); /* repair, so one fault is one error */
			}
			verified_pages++;
			if (rate_mib_s) {
				fill_page(p, i, g + 1);
				gens[i] = (uint32_t)(g + 1);
			}
		}
		uint64_t done = end - page;
		page = end;
		if (rate_mib_s) {
			written_pages += done;
			sched_pages += done;
		}
		if (page == npages) {
			page = 0;
			passes++;
			if (selftest && !corrupted) {
				uint64_t victim = npages / 2;
				mem[victim * PAGE_WORDS + 7] ^= 1ull << 13;
				corrupted = 1;
				fprintf(stderr, "MEMLOAD SELFTEST corrupted page=%" PRIu64 " word=7\n", victim);
			}
		}

		double t = now_s();
		if (rate_mib_s) {
			double due = sched_t0 + (double)sched_pages / pages_per_s;
			if (due > t) {
				sleep_s(due - t);
				t = now_s();
			} else if (t - due > 0.5) {
				/* Too far behind (CPU too slow, or the VM was paused for a
				 * migration): do not burst to catch up, restart the schedule. */
				sched_t0 = t;
				sched_pages = 0;
			}
		} else if (page == 0) {
			/* rate 0: one full verify pass, then idle a few seconds */
			maybe_status(t, 1);
			double until = t + IDLE_VERIFY_PERIOD_S;
			while ((t = now_s()) < until) {
				sleep_s(until - t < 1.0 ? until - t : 1.0);
				maybe_status(now_s(), 0);
			}
		}
		maybe_status(t, 0);
	}
}
