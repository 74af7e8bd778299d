/* zpbench-client: a small HTTP load client that times the whole connection itself.
 *
 * Why not wrk or hey: wrk starts its timer after connect() returns, so it never sees the SYN
 * path where a service lookup (iptables rules, nft maps, zeroproxy's connect4 hook) happens,
 * and hey times the dial at 0.1 ms resolution. A Python client adds hundreds of microseconds of
 * its own. This client measures with CLOCK_MONOTONIC around exactly the work a short-lived
 * client does: socket() + connect() + send request + read the full reply + close().
 *
 * Modes:
 *   short      one connection per request ("Connection: close"; the server closes first, so
 *              TIME_WAIT lands on the server, where the benchmark disables it)
 *   keepalive  one connection per thread, requests back to back; times request -> full reply
 *
 * Each thread picks a target at random per connection (direct mode passes the three backend
 * addresses, the service modes one ClusterIP). Samples before --warmup seconds are dropped.
 * The result is one JSON object on stdout; percentiles come from all kept samples.
 *
 * Build: gcc -O2 -pthread -o zpbench-client client.c   (bench/client.py does this at run time)
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#define MAX_TARGETS 16
#define MAX_THREADS 256
#define MAX_ERRNO 160 /* errors are counted per errno below this; the rest go to slot 0 */
#define BUF_SIZE 16384

enum mode { MODE_SHORT, MODE_KEEPALIVE };

struct samples {
	uint32_t *ns; /* latency of each kept request in ns, saturated at UINT32_MAX */
	size_t len;
	size_t cap;
};

struct thread_ctx {
	pthread_t tid;
	unsigned int seed;
	struct samples total;   /* whole request as defined by the mode */
	struct samples connect; /* socket() + connect() only (short mode) */
	uint64_t requests;      /* kept (after warm-up) successful requests */
	uint64_t reconnects;    /* keep-alive connections that had to be reopened */
	uint64_t errors[MAX_ERRNO]; /* kept failures by errno; [0] = other / bad reply */
};

static struct sockaddr_in targets[MAX_TARGETS];
static int n_targets;
static int n_threads = 1;
static double duration_s = 1.0;
static double warmup_s = 0.2;
static int timeout_ms = 2000;
static enum mode mode = MODE_SHORT;
static size_t max_samples = 5000000; /* per thread; memory bound for long runs */
static uint64_t t_start_ns, t_keep_ns, t_stop_ns;
static const char request_close[] = "GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n";
static const char request_keep[] = "GET / HTTP/1.1\r\nHost: bench\r\n\r\n";

static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void die(const char *msg)
{
	fprintf(stderr, "zpbench-client: %s\n", msg);
	exit(2);
}

static void push(struct samples *s, uint64_t ns)
{
	if (s->len == s->cap) {
		if (s->cap >= max_samples)
			return;
		s->cap = s->cap ? s->cap * 2 : 4096;
		s->ns = realloc(s->ns, s->cap * sizeof(*s->ns));
		if (!s->ns)
			die("out of memory");
	}
	s->ns[s->len++] = ns > UINT32_MAX ? UINT32_MAX : (uint32_t)ns;
}

static void count_error(struct thread_ctx *t, int err, uint64_t when)
{
	if (when < t_keep_ns)
		return;
	t->errors[err > 0 && err < MAX_ERRNO ? err : 0]++;
}

static int open_conn(struct thread_ctx *t, int *err)
{
	const struct sockaddr_in *dst = &targets[n_targets > 1 ? rand_r(&t->seed) % n_targets : 0];
	struct timeval tv = { .tv_sec = timeout_ms / 1000, .tv_usec = (timeout_ms % 1000) * 1000 };
	int one = 1;
	int fd = socket(AF_INET, SOCK_STREAM, 0);

	if (fd < 0) {
		*err = errno;
		return -1;
	}
	/* SO_SNDTIMEO also bounds a blocking connect(), so a lost SYN cannot hang a thread. */
	setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
	setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
	setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	if (connect(fd, (const struct sockaddr *)dst, sizeof(*dst)) < 0) {
		*err = errno;
		close(fd);
		return -1;
	}
	return fd;
}

static int send_all(int fd, const char *buf, size_t len)
{
	while (len) {
		ssize_t n = send(fd, buf, len, MSG_NOSIGNAL);

		if (n < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		buf += n;
		len -= (size_t)n;
	}
	return 0;
}

/* Read one reply. Short mode reads to EOF; keep-alive reads headers + Content-Length bytes.
 * Returns 0 on a 200 reply, a negative errno on a socket error, -EPROTO on a bad reply,
 * -ECONNRESET when a keep-alive connection was closed before a reply started. */
static int read_reply(int fd, char *buf)
{
	size_t have = 0;
	long body = -1;
	size_t head_end = 0;
	int status_ok = 0;

	for (;;) {
		ssize_t n = recv(fd, buf + have, BUF_SIZE - 1 - have, 0);

		if (n < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		if (n == 0) {
			if (mode == MODE_SHORT && have > 0)
				break;
			return have ? -EPROTO : -ECONNRESET;
		}
		have += (size_t)n;
		buf[have] = '\0';
		if (mode == MODE_KEEPALIVE) {
			if (!head_end) {
				char *end = strstr(buf, "\r\n\r\n");
				char *cl;

				if (!end) {
					if (have >= BUF_SIZE - 1)
						return -EPROTO;
					continue;
				}
				head_end = (size_t)(end - buf) + 4;
				cl = strcasestr(buf, "\r\ncontent-length:");
				if (!cl || cl > end)
					return -EPROTO;
				body = strtol(cl + 17, NULL, 10);
			}
			if (have >= head_end + (size_t)body)
				break;
		} else if (have >= BUF_SIZE - 1) {
			/* Short mode only needs the status line and EOF: check it, then drop the rest. */
			if (strncmp(buf, "HTTP/1.1 200", 12) != 0)
				return -EPROTO;
			status_ok = 1;
			have = 0;
		}
	}
	if (!status_ok && strncmp(buf, "HTTP/1.1 200", 12) != 0)
		return -EPROTO;
	return 0;
}

static void *run_short(struct thread_ctx *t)
{
	char *buf = malloc(BUF_SIZE);

	if (!buf)
		die("out of memory");
	for (;;) {
		uint64_t t0 = now_ns(), t1, t2;
		int err = 0, fd, ret;

		if (t0 >= t_stop_ns)
			break;
		fd = open_conn(t, &err);
		t1 = now_ns();
		if (fd < 0) {
			count_error(t, err, t0);
			continue;
		}
		ret = send_all(fd, request_close, sizeof(request_close) - 1);
		if (!ret)
			ret = read_reply(fd, buf);
		close(fd);
		t2 = now_ns();
		if (ret) {
			count_error(t, ret == -EPROTO ? 0 : -ret, t0);
			continue;
		}
		if (t0 >= t_keep_ns && t2 <= t_stop_ns) {
			t->requests++;
			push(&t->total, t2 - t0);
			push(&t->connect, t1 - t0);
		}
	}
	free(buf);
	return NULL;
}

static void *run_keepalive(struct thread_ctx *t)
{
	char *buf = malloc(BUF_SIZE);
	int fd = -1;

	if (!buf)
		die("out of memory");
	for (;;) {
		uint64_t t0, t2;
		int err = 0, ret;

		if (fd < 0) {
			uint64_t c0 = now_ns();

			if (c0 >= t_stop_ns)
				break;
			fd = open_conn(t, &err);
			if (fd < 0) {
				count_error(t, err, c0);
				continue;
			}
			if (c0 >= t_keep_ns)
				push(&t->connect, now_ns() - c0);
		}
		t0 = now_ns();
		if (t0 >= t_stop_ns)
			break;
		ret = send_all(fd, request_keep, sizeof(request_keep) - 1);
		if (!ret)
			ret = read_reply(fd, buf);
		t2 = now_ns();
		if (ret) {
			close(fd);
			fd = -1;
			/* A server closing an idle keep-alive connection is a reconnect, not a failure. */
			if (ret == -ECONNRESET || ret == -EPIPE) {
				if (t0 >= t_keep_ns)
					t->reconnects++;
			} else {
				count_error(t, ret == -EPROTO ? 0 : -ret, t0);
			}
			continue;
		}
		if (t0 >= t_keep_ns && t2 <= t_stop_ns) {
			t->requests++;
			push(&t->total, t2 - t0);
		}
	}
	if (fd >= 0)
		close(fd);
	free(buf);
	return NULL;
}

static void *thread_main(void *arg)
{
	struct thread_ctx *t = arg;

	return mode == MODE_SHORT ? run_short(t) : run_keepalive(t);
}

static int cmp_u32(const void *a, const void *b)
{
	uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;

	return (x > y) - (x < y);
}

/* Merge every thread's samples of one kind and print {"count":..,"p50":..} in microseconds. */
static void print_stats(const char *name, struct thread_ctx *ts, int connect)
{
	static const double pcts[] = { 50, 90, 99, 99.9 };
	static const char *const pct_names[] = { "p50", "p90", "p99", "p999" };
	size_t total = 0, k = 0;
	uint32_t *all;
	double sum = 0;

	for (int i = 0; i < n_threads; i++)
		total += connect ? ts[i].connect.len : ts[i].total.len;
	printf("\"%s\":{\"count\":%zu", name, total);
	if (!total) {
		printf("}");
		return;
	}
	all = malloc(total * sizeof(*all));
	if (!all)
		die("out of memory");
	for (int i = 0; i < n_threads; i++) {
		struct samples *s = connect ? &ts[i].connect : &ts[i].total;

		memcpy(all + k, s->ns, s->len * sizeof(*all));
		k += s->len;
	}
	qsort(all, total, sizeof(*all), cmp_u32);
	for (size_t i = 0; i < total; i++)
		sum += all[i];
	printf(",\"mean\":%.3f,\"min\":%.3f,\"max\":%.3f", sum / total / 1e3, all[0] / 1e3,
	       all[total - 1] / 1e3);
	for (size_t i = 0; i < sizeof(pcts) / sizeof(pcts[0]); i++) {
		/* nearest-rank percentile */
		size_t rank = (size_t)(pcts[i] / 100.0 * (double)total + 0.999999);

		if (rank < 1)
			rank = 1;
		if (rank > total)
			rank = total;
		printf(",\"%s\":%.3f", pct_names[i], all[rank - 1] / 1e3);
	}
	printf("}");
	free(all);
}

static void usage(void)
{
	fprintf(stderr,
		"usage: zpbench-client --target IP:PORT [--target ...] [--mode short|keepalive]\n"
		"                      [--threads N] [--duration S] [--warmup S] [--timeout-ms MS]\n"
		"                      [--cpu N] [--max-samples N]\n");
	exit(2);
}

static void add_target(const char *arg)
{
	char host[64];
	const char *colon = strrchr(arg, ':');
	size_t hlen;

	if (!colon || n_targets >= MAX_TARGETS)
		usage();
	hlen = (size_t)(colon - arg);
	if (hlen >= sizeof(host))
		usage();
	memcpy(host, arg, hlen);
	host[hlen] = '\0';
	targets[n_targets].sin_family = AF_INET;
	targets[n_targets].sin_port = htons((uint16_t)atoi(colon + 1));
	if (inet_pton(AF_INET, host, &targets[n_targets].sin_addr) != 1)
		die("bad target address (IPv4 only)");
	n_targets++;
}

int main(int argc, char **argv)
{
	struct thread_ctx *ts;
	uint64_t requests = 0, reconnects = 0, errors[MAX_ERRNO] = { 0 }, n_errors = 0;
	int cpu = -1, first;

	for (int i = 1; i < argc; i++) {
		const char *a = argv[i];
		const char *v = i + 1 < argc ? argv[i + 1] : NULL;

		if (!v)
			usage();
		if (!strcmp(a, "--target"))
			add_target(v);
		else if (!strcmp(a, "--mode"))
			mode = !strcmp(v, "keepalive") ? MODE_KEEPALIVE : !strcmp(v, "short") ? MODE_SHORT : (usage(), 0);
		else if (!strcmp(a, "--threads"))
			n_threads = atoi(v);
		else if (!strcmp(a, "--duration"))
			duration_s = atof(v);
		else if (!strcmp(a, "--warmup"))
			warmup_s = atof(v);
		else if (!strcmp(a, "--timeout-ms"))
			timeout_ms = atoi(v);
		else if (!strcmp(a, "--cpu"))
			cpu = atoi(v);
		else if (!strcmp(a, "--max-samples"))
			max_samples = (size_t)atoll(v);
		else
			usage();
		i++;
	}
	if (!n_targets || n_threads < 1 || n_threads > MAX_THREADS || duration_s <= 0 || warmup_s < 0)
		usage();
	if (cpu >= 0) {
		cpu_set_t set;

		CPU_ZERO(&set);
		CPU_SET(cpu, &set);
		if (sched_setaffinity(0, sizeof(set), &set) < 0)
			die("sched_setaffinity failed");
	}

	ts = calloc((size_t)n_threads, sizeof(*ts));
	if (!ts)
		die("out of memory");
	t_start_ns = now_ns();
	t_keep_ns = t_start_ns + (uint64_t)(warmup_s * 1e9);
	t_stop_ns = t_keep_ns + (uint64_t)(duration_s * 1e9);
	for (int i = 0; i < n_threads; i++) {
		ts[i].seed = (unsigned int)(t_start_ns ^ (uint64_t)(i * 2654435761u));
		if (pthread_create(&ts[i].tid, NULL, thread_main, &ts[i]))
			die("pthread_create failed");
	}
	for (int i = 0; i < n_threads; i++) {
		pthread_join(ts[i].tid, NULL);
		requests += ts[i].requests;
		reconnects += ts[i].reconnects;
		for (int e = 0; e < MAX_ERRNO; e++) {
			errors[e] += ts[i].errors[e];
			n_errors += ts[i].errors[e];
		}
	}

	printf("{\"mode\":\"%s\",\"threads\":%d,\"targets\":%d,\"duration_s\":%.3f,\"warmup_s\":%.3f,",
	       mode == MODE_SHORT ? "short" : "keepalive", n_threads, n_targets, duration_s, warmup_s);
	printf("\"requests\":%llu,\"rate\":%.1f,\"reconnects\":%llu,\"errors\":%llu,\"errors_by_errno\":{",
	       (unsigned long long)requests, (double)requests / duration_s, (unsigned long long)reconnects,
	       (unsigned long long)n_errors);
	first = 1;
	for (int e = 0; e < MAX_ERRNO; e++) {
		if (!errors[e])
			continue;
		const char *name = e ? strerrorname_np(e) : "bad_reply";

		if (name)
			printf("%s\"%s\":%llu", first ? "" : ",", name, (unsigned long long)errors[e]);
		else
			printf("%s\"errno%d\":%llu", first ? "" : ",", e, (unsigned long long)errors[e]);
		first = 0;
	}
	printf("},");
	print_stats("latency_us", ts, 0);
	printf(",");
	print_stats("connect_us", ts, 1);
	printf("}\n");
	return 0;
}
