/*
 * Metadata workload helper for tests/bench/bench.py.
 *
 *   meta ROOT N
 *
 * Makes ROOT/d000, ROOT/d001, ... (1,000 files per directory), then reads
 * one phase name per line from stdin and runs it over all N files:
 *
 *   create  open(O_CREAT|O_EXCL|O_WRONLY), write 128 bytes, close
 *   stat    stat every file
 *   rename  rename dNNN/fNNNNNN to dNNN/rNNNNNN (same directory)
 *   unlink  unlink every file, then (untimed) remove the directories
 *   quit    exit 0
 *
 * After each phase it prints "<phase> <seconds>" and flushes, so that the
 * driver can run two helpers phase by phase in lockstep (dual-native).
 * Any failed call prints "error <phase> <path>: <strerror>" and exits 1.
 *
 * It is C rather than Python because on a plain ext4 directory Python's
 * per-call overhead cost about 30% of the stat rate; the timings here are
 * of the system calls alone, apart from a snprintf per file.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static const char *root;
static long n;
static int renamed;

static double now(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

static void path(char *buf, size_t len, long i, char prefix)
{
	snprintf(buf, len, "%s/d%03ld/%c%06ld", root, i / 1000, prefix, i);
}

static void fail(const char *phase, const char *p)
{
	printf("error %s %s: %s\n", phase, p, strerror(errno));
	fflush(stdout);
	exit(1);
}

int main(int argc, char **argv)
{
	char p[4096], q[4096], line[64];
	static const char data[128];
	struct stat st;
	long i, dirs;

	if (argc != 3) {
		fprintf(stderr, "usage: meta ROOT N\n");
		return 2;
	}
	root = argv[1];
	n = atol(argv[2]);
	dirs = (n + 999) / 1000;
	for (i = 0; i < dirs; i++) {
		snprintf(p, sizeof p, "%s/d%03ld", root, i);
		if (mkdir(p, 0755) != 0)
			fail("mkdir", p);
	}
	printf("ready\n");
	fflush(stdout);

	while (fgets(line, sizeof line, stdin)) {
		double t;
		line[strcspn(line, "\n")] = 0;
		t = now();
		if (strcmp(line, "create") == 0) {
			for (i = 0; i < n; i++) {
				int fd;
				path(p, sizeof p, i, 'f');
				fd = open(p, O_CREAT | O_EXCL | O_WRONLY, 0644);
				if (fd < 0)
					fail(line, p);
				if (write(fd, data, sizeof data) != (ssize_t)sizeof data)
					fail(line, p);
				if (close(fd) != 0)
					fail(line, p);
			}
		} else if (strcmp(line, "stat") == 0) {
			for (i = 0; i < n; i++) {
				path(p, sizeof p, i, renamed ? 'r' : 'f');
				if (stat(p, &st) != 0)
					fail(line, p);
			}
		} else if (strcmp(line, "rename") == 0) {
			for (i = 0; i < n; i++) {
				path(p, sizeof p, i, 'f');
				path(q, sizeof q, i, 'r');
				if (rename(p, q) != 0)
					fail(line, p);
			}
			renamed = 1;
		} else if (strcmp(line, "unlink") == 0) {
			for (i = 0; i < n; i++) {
				path(p, sizeof p, i, renamed ? 'r' : 'f');
				if (unlink(p) != 0)
					fail(line, p);
			}
		} else if (strcmp(line, "quit") == 0) {
			return 0;
		} else {
			errno = EINVAL;
			fail("command", line);
		}
		t = now() - t;
		if (strcmp(line, "unlink") == 0) {
			for (i = 0; i < dirs; i++) {
				snprintf(p, sizeof p, "%s/d%03ld", root, i);
				if (rmdir(p) != 0)
					fail("rmdir", p);
			}
		}
		printf("%s %.6f\n", line, t);
		fflush(stdout);
	}
	return 0;
}
