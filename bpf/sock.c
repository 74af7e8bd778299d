/* Socket-level service translation: cgroup sock_addr hooks rewrite a service address to a
 * backend once per connect() (and once per datagram for unconnected UDP), and restore the
 * service address on the way back (recvmsg, getpeername). No per-packet NAT.
 *
 * Attach points: connect4/6, sendmsg4/6, recvmsg4/6, getpeername4/6. IPv4-mapped IPv6
 * addresses on dual-stack sockets are translated through the IPv4 tables. */
#define ZP_MAPS_LB 1 /* maps.h: service, backend, reverse-NAT and affinity maps, zp_stats */
#include "lib/lb.h"
#include <uapi/linux/if_ether.h>

/* loadBalancerSourceRanges at the socket. At connect()/sendmsg() the source address is often
 * not chosen yet, so the hook only marks the socket with the service port whose ranges apply,
 * and zp_sock_egress checks the first packet's real source: allowed, the mark goes (a
 * connected socket costs nothing more); refused, that packet and every later one is dropped.
 * Per socket, not pinned: a socket marked by programs of an earlier agent is not checked. */
struct sk_src_mark {
	__u32 rev_nat_id; /* service port whose source ranges the next packet must match; 0 = none */
};

BPF_SK_STORAGE(zp_sk_src, struct sk_src_mark);

/* Mark the socket for a source check (rev_nat_id) or clear an earlier mark (0): an unconnected
 * UDP socket's datagrams each go their own way. */
static __always_inline int __sock_src_mark(struct bpf_sock_addr *ctx, __u16 rev_nat_id)
{
	struct sk_src_mark *mark;

	if (!rev_nat_id) {
		if (ctx->type != SOCK_DGRAM)
			return ZP_OK; /* a stream socket connects once: there is no earlier mark */
		mark = zp_sk_src.sk_storage_get(ctx->sk, 0, 0);
		if (mark)
			mark->rev_nat_id = 0;
		return ZP_OK;
	}
	mark = zp_sk_src.sk_storage_get(ctx->sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!mark)
		return ZP_ESRCRANGE; /* cannot check it later: refuse now rather than let it through */
	mark->rev_nat_id = rev_nat_id;
	return ZP_OK;
}

/* Count an inner result and choose the hook's verdict; the only place that does either. */
static __always_inline int __sock_account(int ret)
{
	switch (ret) {
	case ZP_OK:
		zp_count(ZP_REASON_XLATE_OK);
		return SYS_PROCEED;
	case ZP_ENOTSVC:
		return SYS_PROCEED;
	case ZP_ENOBACKEND:
		zp_count(ZP_REASON_NO_BACKEND);
		return SYS_REJECT;
	case ZP_ESTALE:
		zp_count(ZP_REASON_STALE_BACKEND);
		return SYS_REJECT;
	case ZP_ESRCRANGE:
		zp_count(ZP_REASON_SRC_RANGE);
		return SYS_REJECT;
	default:
		zp_count(ZP_REASON_UNKNOWN); /* a code added without a case here: rejected, and visible */
		return SYS_REJECT;
	}
}

/* The forward hooks' verdict. A rejected connect()/sendmsg() fails with ECONNREFUSED at once,
 * like kube-proxy's REJECT rule. */
static __always_inline int __sock_verdict(int ret)
{
	int verdict = __sock_account(ret);

	if (verdict == SYS_REJECT)
		bpf_set_retval(ret == ZP_ESRCRANGE ? -EPERM : -ECONNREFUSED);
	return verdict;
}

static __always_inline __u8 __sock_proto(const struct bpf_sock_addr *ctx)
{
	/* ctx->protocol is 0 for sockets created with protocol 0; fall back on the type. */
	if (ctx->protocol)
		return (__u8)ctx->protocol;
	return ctx->type == SOCK_DGRAM ? IPPROTO_UDP : IPPROTO_TCP;
}

/* ---- IPv4 ------------------------------------------------------------------------------ */

/* Translate an IPv4 destination; *addr / *port are updated in place on success, and *check
 * is the service port whose source ranges the socket must pass (0 = none). */
static __always_inline int
__sock4_xlate_fwd(struct bpf_sock_addr *ctx, __be32 *addr, __be16 *port, __u16 *check)
{
	struct lb4_key key;
	struct lb4_backend be;
	struct lb_service *svc;
	struct rnat4_key rkey = {};
	struct rnat4_value rval = {};
	__u32 backend_id;
	int ret;

	svc = lb4_lookup_service(*addr, *port, __sock_proto(ctx), &key);
	if (!svc)
		return ZP_ENOTSVC;
	if (svc->flags & ZP_SVC_F_SRC_RANGE)
		*check = svc->rev_nat_id;
	ret = lb4_select_backend_sticky(&key, svc, &be, bpf_get_netns_cookie(ctx), &backend_id);
	if (ret < 0)
		return ret;

	rkey.cookie = bpf_get_socket_cookie(ctx);
	rkey.address = be.address;
	rkey.port = be.port;
	rval.address = *addr;
	rval.port = *port;
	rval.rev_nat_id = svc->rev_nat_id;
	if (zp_rnat4.update(&rkey, &rval) < 0)
		zp_count(ZP_REASON_RNAT_WRITE);

	*addr = be.address;
	*port = be.port;
	return ZP_OK;
}

/* Restore the service address as the peer/source of a reply from a backend. */
static __always_inline void __sock4_xlate_rev(struct bpf_sock_addr *ctx, __be32 *addr, __be16 *port)
{
	struct rnat4_key rkey = {};
	struct rnat4_value *rval;

	rkey.cookie = bpf_get_socket_cookie(ctx);
	rkey.address = *addr;
	rkey.port = *port;
	rval = zp_rnat4.lookup(&rkey);
	if (!rval)
		return;
	zp_count(ZP_REASON_RNAT_HIT);
	*addr = rval->address;
	*port = rval->port;
}

static __always_inline int __sock4_fwd(struct bpf_sock_addr *ctx)
{
	__be32 addr = ctx->user_ip4;
	__be16 port = (__be16)ctx->user_port;
	__u16 check = 0;
	int ret = __sock4_xlate_fwd(ctx, &addr, &port, &check);

	if (ret == ZP_OK || ret == ZP_ENOTSVC)
		ret = __sock_src_mark(ctx, check) ?: ret;
	if (ret == ZP_OK) {
		ctx->user_ip4 = addr;
		ctx->user_port = port;
	}
	return __sock_verdict(ret);
}

static __always_inline int __sock4_rev(struct bpf_sock_addr *ctx)
{
	__be32 addr = ctx->user_ip4;
	__be16 port = (__be16)ctx->user_port;

	__sock4_xlate_rev(ctx, &addr, &port);
	ctx->user_ip4 = addr;
	ctx->user_port = port;
	return SYS_PROCEED;
}

int zp_sock4_connect(struct bpf_sock_addr *ctx) { return __sock4_fwd(ctx); }
int zp_sock4_sendmsg(struct bpf_sock_addr *ctx) { return __sock4_fwd(ctx); }
int zp_sock4_recvmsg(struct bpf_sock_addr *ctx) { return __sock4_rev(ctx); }
int zp_sock4_getpeername(struct bpf_sock_addr *ctx) { return __sock4_rev(ctx); }

/* ---- IPv6 ------------------------------------------------------------------------------ */

static __always_inline bool __ip6_is_v4mapped(const __u32 a[4])
{
	return a[0] == 0 && a[1] == 0 && a[2] == bpf_htonl(0x0000ffff);
}

static __always_inline void __ctx_get_ip6(const struct bpf_sock_addr *ctx, __u32 a[4])
{
	/* The verifier only allows 4-byte loads of user_ip6. */
	a[0] = ctx->user_ip6[0];
	a[1] = ctx->user_ip6[1];
	a[2] = ctx->user_ip6[2];
	a[3] = ctx->user_ip6[3];
}

static __always_inline void __ctx_set_ip6(struct bpf_sock_addr *ctx, const __u32 a[4])
{
	ctx->user_ip6[0] = a[0];
	ctx->user_ip6[1] = a[1];
	ctx->user_ip6[2] = a[2];
	ctx->user_ip6[3] = a[3];
}

static __always_inline int
__sock6_xlate_fwd(struct bpf_sock_addr *ctx, __u32 addr[4], __be16 *port, __u16 *check)
{
	struct lb6_key key;
	struct lb6_backend be;
	struct lb_service *svc;
	struct rnat6_key rkey = {};
	struct rnat6_value rval = {};
	__u32 backend_id;
	int ret;

	svc = lb6_lookup_service(addr, *port, __sock_proto(ctx), &key);
	if (!svc)
		return ZP_ENOTSVC;
	if (svc->flags & ZP_SVC_F_SRC_RANGE)
		*check = svc->rev_nat_id;
	ret = lb6_select_backend_sticky(&key, svc, &be, bpf_get_netns_cookie(ctx), &backend_id);
	if (ret < 0)
		return ret;

	rkey.cookie = bpf_get_socket_cookie(ctx);
	__builtin_memcpy(rkey.address, be.address, 16);
	rkey.port = be.port;
	__builtin_memcpy(rval.address, addr, 16);
	rval.port = *port;
	rval.rev_nat_id = svc->rev_nat_id;
	if (zp_rnat6.update(&rkey, &rval) < 0)
		zp_count(ZP_REASON_RNAT_WRITE);

	__builtin_memcpy(addr, be.address, 16);
	*port = be.port;
	return ZP_OK;
}

static __always_inline void __sock6_xlate_rev(struct bpf_sock_addr *ctx, __u32 addr[4], __be16 *port)
{
	struct rnat6_key rkey = {};
	struct rnat6_value *rval;

	rkey.cookie = bpf_get_socket_cookie(ctx);
	__builtin_memcpy(rkey.address, addr, 16);
	rkey.port = *port;
	rval = zp_rnat6.lookup(&rkey);
	if (!rval)
		return;
	zp_count(ZP_REASON_RNAT_HIT);
	__builtin_memcpy(addr, rval->address, 16);
	*port = rval->port;
}

static __always_inline int __sock6_fwd(struct bpf_sock_addr *ctx)
{
	__u32 addr[4];
	__be16 port = (__be16)ctx->user_port;
	__u16 check = 0;
	int ret;

	__ctx_get_ip6(ctx, addr);
	if (__ip6_is_v4mapped(addr)) {
		__be32 addr4 = addr[3];

		ret = __sock4_xlate_fwd(ctx, &addr4, &port, &check);
		addr[3] = addr4;
	} else {
		ret = __sock6_xlate_fwd(ctx, addr, &port, &check);
	}
	if (ret == ZP_OK || ret == ZP_ENOTSVC)
		ret = __sock_src_mark(ctx, check) ?: ret;
	if (ret == ZP_OK) {
		__ctx_set_ip6(ctx, addr);
		ctx->user_port = port;
	}
	return __sock_verdict(ret);
}

static __always_inline int __sock6_rev(struct bpf_sock_addr *ctx)
{
	__u32 addr[4];
	__be16 port = (__be16)ctx->user_port;

	__ctx_get_ip6(ctx, addr);
	if (__ip6_is_v4mapped(addr)) {
		__be32 addr4 = addr[3];

		__sock4_xlate_rev(ctx, &addr4, &port);
		addr[3] = addr4;
	} else {
		__sock6_xlate_rev(ctx, addr, &port);
	}
	__ctx_set_ip6(ctx, addr);
	ctx->user_port = port;
	return SYS_PROCEED;
}

int zp_sock6_connect(struct bpf_sock_addr *ctx) { return __sock6_fwd(ctx); }
int zp_sock6_sendmsg(struct bpf_sock_addr *ctx) { return __sock6_fwd(ctx); }
int zp_sock6_recvmsg(struct bpf_sock_addr *ctx) { return __sock6_rev(ctx); }
int zp_sock6_getpeername(struct bpf_sock_addr *ctx) { return __sock6_rev(ctx); }

/* ---- loadBalancerSourceRanges: the first packet of a marked socket (cgroup skb egress) ----- */

int zp_sock_egress(struct __sk_buff *skb)
{
	struct bpf_sock *sk = skb->sk;
	struct sk_src_mark *mark;
	__u8 saddr6[16];
	__be32 saddr;
	bool ok;

	if (!sk)
		return 1;
	sk = bpf_sk_fullsock(sk);
	if (!sk)
		return 1;
	mark = zp_sk_src.sk_storage_get(sk, 0, 0);
	if (!mark || !mark->rev_nat_id)
		return 1;
	/* cgroup skb programs see the packet from its network header on */
	if (skb->protocol == bpf_htons(ETH_P_IP)) {
		if (bpf_skb_load_bytes(skb, 12, &saddr, 4) < 0)
			return 1;
		ok = lb4_src_range_ok(mark->rev_nat_id, saddr);
	} else if (skb->protocol == bpf_htons(ETH_P_IPV6)) {
		if (bpf_skb_load_bytes(skb, 8, saddr6, 16) < 0)
			return 1;
		ok = lb6_src_range_ok(mark->rev_nat_id, saddr6);
	} else {
		return 1;
	}
	if (ok) {
		mark->rev_nat_id = 0;
		return 1;
	}
	zp_count(ZP_REASON_SRC_RANGE);
	return 0; /* dropped: TCP's SYN never leaves (the connect times out), UDP's send fails */
}
