/* Scale to zero: hand connections for a checkpointed pod to the activation proxy.
 *
 * Attach point: BPF_SK_LOOKUP, one link per opted-in pod's network namespace. The program runs
 * when the kernel looks for a listening socket for a SYN (before the normal lookup), so
 * established flows are never touched, no packet is rewritten, and removing the redirect flag
 * hands the next SYN straight back to the restored app. */
#define ZP_MAPS_S2Z 1 /* maps.h: scale to zero's maps only */
#include "lib/activation.h"

static __always_inline int __s2z_lookup(struct bpf_sk_lookup *ctx, __u32 *slot)
{
	struct s2z_port_key key = {};
	struct s2z_port_value *pv;
	struct s2z_pod *pod;
	struct bpf_sock *sk;
	__u32 sk_key;
	long err;

	if (ctx->protocol != IPPROTO_TCP)
		return ZP_ENOTSVC;
	key.family = (__u8)ctx->family;
	key.proto = IPPROTO_TCP;
	key.port = (__u16)ctx->local_port;
	if (ctx->family == ZP_AF_INET) {
		__builtin_memcpy(key.address, &ctx->local_ip4, 4);
	} else if (ctx->family == ZP_AF_INET6) {
		__u32 a0 = ctx->local_ip6[0], a1 = ctx->local_ip6[1];
		__u32 a2 = ctx->local_ip6[2], a3 = ctx->local_ip6[3];

		__builtin_memcpy(key.address, &a0, 4);
		__builtin_memcpy(key.address + 4, &a1, 4);
		__builtin_memcpy(key.address + 8, &a2, 4);
		__builtin_memcpy(key.address + 12, &a3, 4);
	} else {
		return ZP_ENOTSVC;
	}
	pv = zp_s2z_ports.lookup(&key);
	if (!pv)
		return ZP_ENOTSVC;
	*slot = pv->pod;
	pod = zp_s2z_pods.lookup(slot);
	if (!pod || !pod->redirect)
		return ZP_EDIRECT;

	sk_key = 2 * pv->pod + (ctx->family == ZP_AF_INET6 ? 1 : 0);
	sk = (struct bpf_sock *)zp_s2z_socks.lookup(&sk_key);
	if (!sk)
		return ZP_ENOLISTENER;
	err = bpf_sk_assign(ctx, sk, 0);
	bpf_sk_release(sk);
	return err ? ZP_EASSIGN : ZP_OK;
}

/* Does the connection come from one of the node's own addresses (a kubelet probe)? */
static __always_inline bool __s2z_from_node(const struct bpf_sk_lookup *ctx)
{
	struct s2z_addr_key key = {};

	key.family = (__u8)ctx->family;
	if (ctx->family == ZP_AF_INET) {
		__u32 a = ctx->remote_ip4;

		__builtin_memcpy(key.address, &a, 4);
	} else {
		__u32 a0 = ctx->remote_ip6[0], a1 = ctx->remote_ip6[1];
		__u32 a2 = ctx->remote_ip6[2], a3 = ctx->remote_ip6[3];

		__builtin_memcpy(key.address, &a0, 4);
		__builtin_memcpy(key.address + 4, &a1, 4);
		__builtin_memcpy(key.address + 8, &a2, 4);
		__builtin_memcpy(key.address + 12, &a3, 4);
	}
	return zp_s2z_nodes.lookup(&key) != NULL;
}

/* The only place that turns an inner result into counters (one s2z_stats field per
 * ZP_REASON_S2Z_* reason); the verdict is always SK_PASS:
 * either the assigned socket or, failing that, the kernel's own lookup (the app, or a RST). */
int zp_s2z_lookup(struct bpf_sk_lookup *ctx)
{
	__u32 slot = 0;
	int ret = __s2z_lookup(ctx, &slot);
	struct s2z_stats *st;

	if (ret == ZP_ENOTSVC)
		return SK_PASS;
	st = zp_s2z_stats.lookup(&slot);
	if (!st)
		return SK_PASS;
	st->lookups++;
	if (__s2z_from_node(ctx))
		st->from_node++;
	switch (ret) {
	case ZP_OK:
		st->assigned++;
		break;
	case ZP_ENOLISTENER:
		st->no_listener++;
		break;
	case ZP_EASSIGN:
		st->assign_fail++;
		break;
	case ZP_EDIRECT:
		break; /* counted in lookups only: the app takes it */
	default:
		break; /* a code without a case: passed on, counted in lookups only */
	}
	return SK_PASS;
}
