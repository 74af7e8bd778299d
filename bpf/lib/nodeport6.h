/* IPv6 NodePort, ExternalIP and LoadBalancer IP frontends on the external devices: the IPv4
 * path of lib/nodeport.h with 16-byte addresses. Conntrack (zp_ct6), SNAT of remote backends
 * to the device's IPv6 address (zp_np_dev6), the reverse path (zp_snat6). The state machine,
 * timeouts, counters and verdicts are the IPv4 path's own (one list of reasons).
 *
 * Not here: ClientIP affinity and Maglev for IPv6 (new flows pick at random); packets with
 * extension headers before TCP/UDP are left to the stack. */
#ifndef ZP_NODEPORT6_H
#define ZP_NODEPORT6_H

#include "nodeport.h"
#include <uapi/linux/ipv6.h>

#define ZP_IP6_OFF       ETH_HLEN
#define ZP_IP6_SADDR_OFF (ETH_HLEN + 8)
#define ZP_IP6_DADDR_OFF (ETH_HLEN + 24)
#define ZP_IP6_HLEN      40

struct pkt6 {
	__u8 saddr[16];
	__u8 daddr[16];
	__be16 sport;
	__be16 dport;
	__u32 l4_off;
	__u8 proto;
	__u8 tcp_flags;
	__u8 pad[2];
};

static __always_inline bool __ip6_eq(const __u8 a[16], const __u8 b[16])
{
	const __u32 *x = (const __u32 *)a, *y = (const __u32 *)b;

	return x[0] == y[0] && x[1] == y[1] && x[2] == y[2] && x[3] == y[3];
}

static __always_inline bool __ip6_zero(const __u8 a[16])
{
	const __u32 *x = (const __u32 *)a;

	return !(x[0] | x[1] | x[2] | x[3]);
}

/* An IPv6 TCP/UDP packet without extension headers; ZP_ENOTSVC for anything else. */
static __always_inline int pkt6_parse(struct __sk_buff *skb, struct pkt6 *p)
{
	struct ipv6hdr ip;
	__be16 ports[2];

	if (skb->protocol != bpf_htons(ETH_P_IPV6))
		return ZP_ENOTSVC;
	if (bpf_skb_load_bytes(skb, ZP_IP6_OFF, &ip, sizeof(ip)) < 0)
		return ZP_ENOTSVC;
	if (ip.version != 6 || (ip.nexthdr != IPPROTO_TCP && ip.nexthdr != IPPROTO_UDP))
		return ZP_ENOTSVC;
	__builtin_memcpy(p->saddr, &ip.saddr, 16);
	__builtin_memcpy(p->daddr, &ip.daddr, 16);
	p->proto = ip.nexthdr;
	p->l4_off = ZP_IP6_OFF + ZP_IP6_HLEN;
	if (bpf_skb_load_bytes(skb, p->l4_off, ports, sizeof(ports)) < 0)
		return ZP_ENOTSVC;
	p->sport = ports[0];
	p->dport = ports[1];
	p->tcp_flags = 0;
	if (p->proto == IPPROTO_TCP &&
	    bpf_skb_load_bytes(skb, p->l4_off + ZP_TCP_FLAGS, &p->tcp_flags, 1) < 0)
		return ZP_ENOTSVC;
	return ZP_OK;
}

/* Replace one address: the L4 checksum covers it through the pseudo-header (IPv6 has no header
 * checksum of its own). */
static __always_inline int __csum6_set_addr(struct __sk_buff *skb, const struct pkt6 *p, __u32 off,
					    const __u8 from[16], const __u8 to[16])
{
	__u32 csum_off = p->l4_off + (p->proto == IPPROTO_TCP ? ZP_TCP_CSUM : ZP_UDP_CSUM);
	__u64 l4_flags = (p->proto == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0) | BPF_F_PSEUDO_HDR;
	__u32 a[4], b[4];
	__s64 diff;

	if (__ip6_eq(from, to))
		return ZP_OK;
	__builtin_memcpy(a, from, 16);
	__builtin_memcpy(b, to, 16);
	diff = bpf_csum_diff(a, 16, b, 16, 0);
	if (diff < 0 || bpf_l4_csum_replace(skb, csum_off, 0, (__u32)diff, l4_flags) < 0)
		return ZP_EREWRITE;
	if (bpf_skb_store_bytes(skb, off, b, 16, 0) < 0)
		return ZP_EREWRITE;
	return ZP_OK;
}

static __always_inline int pkt6_rewrite(struct __sk_buff *skb, const struct pkt6 *p, const __u8 saddr[16],
					__be16 sport, const __u8 daddr[16], __be16 dport)
{
	if (__csum6_set_addr(skb, p, ZP_IP6_SADDR_OFF, p->saddr, saddr) < 0 ||
	    __csum6_set_addr(skb, p, ZP_IP6_DADDR_OFF, p->daddr, daddr) < 0 ||
	    __csum_set_port(skb, p->l4_off, p->proto, p->l4_off, p->sport, sport) < 0 ||
	    __csum_set_port(skb, p->l4_off, p->proto, p->l4_off + 2, p->dport, dport) < 0)
		return ZP_EREWRITE;
	return ZP_OK;
}

static __always_inline int fib6_lookup(struct __sk_buff *skb, const struct pkt6 *p, const __u8 saddr[16],
				       const __u8 daddr[16], struct bpf_fib_lookup *fib)
{
	__builtin_memset(fib, 0, sizeof(*fib));
	fib->family = ZP_AF_INET6;
	fib->l4_protocol = p->proto;
	fib->ifindex = skb->ifindex;
	__builtin_memcpy(fib->ipv6_src, saddr, 16);
	__builtin_memcpy(fib->ipv6_dst, daddr, 16);
	return bpf_fib_lookup(skb, fib, sizeof(*fib), 0);
}

static __always_inline struct lb_service *
lb6_lookup_external(const __u8 addr[16], __be16 port, __u8 proto, struct lb6_key *key)
{
	__u32 a[4];
	struct lb_service *svc;

	__builtin_memcpy(a, addr, 16);
	svc = lb6_lookup_service(a, port, proto, key);
	if (svc && (svc->flags & ZP_SVC_F_SCOPED)) {
		key->scope = ZP_SCOPE_EXTERNAL;
		svc = zp_lb6_svc.lookup(key);
	}
	return svc;
}

/* ---- conntrack and SNAT ---------------------------------------------------------------------- */

static __always_inline bool ct6_live(const struct ct6_entry *ct, const struct pkt6 *p, __u64 now)
{
	if (ct->expires <= now)
		return false;
	return !(ct->state == ZP_CT_CLOSING && __tcp_syn(p->proto, p->tcp_flags));
}

static __always_inline void ct6_update(struct ct6_entry *ct, const struct np_config *cfg,
				       const struct pkt6 *p, bool reply, __u64 now)
{
	__u32 secs = __ct_advance(&ct->state, &ct->flags, cfg, p->proto, p->tcp_flags, reply);

	ct->expires = now + (__u64)secs * ZP_NSEC_PER_SEC;
}

static __always_inline void nat6_ct_key(const struct nat6_entry *nat, __u8 proto, struct tuple6 *key)
{
	__builtin_memset(key, 0, sizeof(*key));
	__builtin_memcpy(key->saddr, nat->client_addr, 16);
	__builtin_memcpy(key->daddr, nat->frontend_addr, 16);
	key->sport = nat->client_port;
	key->dport = nat->frontend_port;
	key->proto = proto;
}

static __always_inline bool __snat6_stale(const struct tuple6 *rkey, __u64 now)
{
	struct nat6_entry *old = zp_snat6.lookup((void *)rkey);
	struct ct6_entry *ct;
	struct tuple6 ckey;

	if (!old)
		return true;
	nat6_ct_key(old, rkey->proto, &ckey);
	ct = zp_ct6.lookup(&ckey);
	return !ct || ct->expires <= now || !__ip6_eq(ct->snat_addr, rkey->daddr) || ct->snat_port != rkey->dport;
}

static __always_inline __u32 __snat6_hash(const struct tuple6 *fwd)
{
	const __u32 *s = (const __u32 *)fwd->saddr, *d = (const __u32 *)fwd->daddr;
	__u32 h = s[0] ^ s[1] ^ s[2] ^ s[3] ^ d[0] ^ d[1] ^ d[2] ^ d[3] ^
		  ((__u32)fwd->sport << 16 | fwd->dport) ^ fwd->proto;

	return __mix32(h);
}

static __always_inline int snat6_alloc(const struct np_config *cfg, const struct tuple6 *fwd,
				       struct tuple6 *rkey, const struct nat6_entry *nat, __u64 now)
{
	__u32 min = cfg->snat_port_min;
	__u32 range = (__u32)cfg->snat_port_max - min + 1;
	__u32 port = __snat6_hash(fwd) % range;

	for (int i = 0; i < ZP_SNAT_TRIES; i++) {
		rkey->dport = bpf_htons((__u16)(min + port));
		if (zp_snat6.insert(rkey, (struct nat6_entry *)nat) == 0)
			return ZP_OK;
		if (__snat6_stale(rkey, now) && zp_snat6.update(rkey, (struct nat6_entry *)nat) == 0)
			return ZP_OK;
		port = bpf_get_prandom_u32() % range;
	}
	return ZP_ENOSNATPORT;
}

static __always_inline void nat6_forget(const struct tuple6 *fwd, const struct ct6_entry *ct)
{
	struct tuple6 rkey = {};

	__builtin_memcpy(rkey.saddr, ct->backend_addr, 16);
	rkey.sport = ct->backend_port;
	rkey.proto = fwd->proto;
	if (ct->flags & ZP_CT_F_SNAT) {
		__builtin_memcpy(rkey.daddr, ct->snat_addr, 16);
		rkey.dport = ct->snat_port;
	} else {
		__builtin_memcpy(rkey.daddr, fwd->saddr, 16);
		rkey.dport = fwd->sport;
	}
	zp_snat6.delete(&rkey);
	zp_ct6.delete((void *)fwd);
}

static __always_inline bool __np6_backend_alive(const struct ct6_entry *ct)
{
	__u32 id = ct->backend_id;
	struct lb6_backend *be = zp_lb6_be.lookup(&id);

	return be && __ip6_eq(be->address, ct->backend_addr) && be->port == ct->backend_port;
}

/* ---- the flow ---------------------------------------------------------------------------------- */

static __always_inline int __np6_new_flow(struct __sk_buff *skb, const struct pkt6 *p,
					  const struct np_config *cfg, const struct tuple6 *fwd,
					  struct lb6_key *key, const struct lb_service *svc,
					  struct ct6_entry *ct, struct bpf_fib_lookup *fib, int *fib_rc, __u64 now)
{
	__u32 svc_flags = svc->flags;
	struct nat6_entry nat = {};
	struct tuple6 rkey = {};
	struct lb6_backend be;
	struct np_dev6 *dev;
	__u32 backend_id = 0;
	__u32 out_ifindex;
	int ret;

	if (p->proto == IPPROTO_TCP && !__tcp_syn(p->proto, p->tcp_flags))
		return ZP_ECTMISS;
	ret = lb6_select_backend_sticky(key, svc, &be, 0, &backend_id);
	if (ret == ZP_ENOBACKEND && (svc_flags & ZP_SVC_F_NODEPORT))
		return ZP_EREFUSE;
	if (ret < 0)
		return ret;

	*fib_rc = fib6_lookup(skb, p, p->saddr, be.address, fib);
	if (*fib_rc != BPF_FIB_LKUP_RET_SUCCESS && *fib_rc != BPF_FIB_LKUP_RET_NO_NEIGH)
		return ZP_EFIB;
	out_ifindex = fib->ifindex;
	dev = zp_np_dev6.lookup(&out_ifindex);

	__builtin_memset(ct, 0, sizeof(*ct));
	__builtin_memcpy(ct->backend_addr, be.address, 16);
	ct->backend_port = be.port;
	ct->backend_id = backend_id;
	ct->rev_nat_id = svc->rev_nat_id;
	__builtin_memcpy(nat.client_addr, p->saddr, 16);
	nat.client_port = p->sport;
	__builtin_memcpy(nat.frontend_addr, p->daddr, 16);
	nat.frontend_port = p->dport;
	__builtin_memcpy(rkey.saddr, be.address, 16);
	rkey.sport = be.port;
	rkey.proto = p->proto;
	if (dev && !(svc_flags & ZP_SVC_F_LOCAL)) {
		nat.flags = ZP_NAT_F_SNAT;
		__builtin_memcpy(rkey.daddr, dev->addr, 16);
		ret = snat6_alloc(cfg, fwd, &rkey, &nat, now);
		if (ret < 0)
			return ret;
		__builtin_memcpy(ct->snat_addr, rkey.daddr, 16);
		ct->snat_port = rkey.dport;
		ct->flags = ZP_CT_F_SNAT;
	} else {
		__builtin_memcpy(rkey.daddr, p->saddr, 16);
		rkey.dport = p->sport;
		if (zp_snat6.update(&rkey, &nat) < 0)
			return ZP_EMAPWRITE;
	}
	ct6_update(ct, cfg, p, false, now);
	if (zp_ct6.update((void *)fwd, ct) < 0) {
		zp_snat6.delete(&rkey);
		return ZP_EMAPWRITE;
	}
	np_count(ZP_REASON_NEW_FLOW);
	return ZP_OK;
}

static __always_inline int __np6_service(struct __sk_buff *skb, const struct pkt6 *p, const struct np_config *cfg)
{
	struct bpf_fib_lookup fib;
	struct lb6_key key;
	struct lb_service *svc;
	struct ct6_entry *found;
	struct ct6_entry ct;
	struct tuple6 fwd = {};
	__u8 saddr[16];
	__be16 sport = p->sport;
	int fib_rc = -1;
	__u64 now;
	int ret;

	svc = lb6_lookup_external(p->daddr, p->dport, p->proto, &key);
	if (!svc || !(svc->flags & ZP_SVC_F_EXTERNAL))
		return ZP_ENOTSVC;
	if ((svc->flags & ZP_SVC_F_SRC_RANGE) && !lb6_src_range_ok(svc->rev_nat_id, p->saddr))
		return ZP_ESRCRANGE;
	__builtin_memcpy(fwd.saddr, p->saddr, 16);
	__builtin_memcpy(fwd.daddr, p->daddr, 16);
	fwd.sport = p->sport;
	fwd.dport = p->dport;
	fwd.proto = p->proto;
	now = bpf_ktime_get_ns();

	found = zp_ct6.lookup(&fwd);
	if (found && ct6_live(found, p, now) && !__np6_backend_alive(found)) {
		nat6_forget(&fwd, found);
		if (p->proto == IPPROTO_TCP && !__tcp_syn(p->proto, p->tcp_flags))
			return ZP_ECTGONE;
		found = NULL;
	} else if (found && !ct6_live(found, p, now)) {
		nat6_forget(&fwd, found);
		found = NULL;
	}
	if (found) {
		ct6_update(found, cfg, p, false, now);
		ct = *found;
		np_count(ZP_REASON_FWD);
	} else {
		ret = __np6_new_flow(skb, p, cfg, &fwd, &key, svc, &ct, &fib, &fib_rc, now);
		if (ret < 0)
			return ret;
	}

	__builtin_memcpy(saddr, p->saddr, 16);
	if (ct.flags & ZP_CT_F_SNAT) {
		__builtin_memcpy(saddr, ct.snat_addr, 16);
		sport = ct.snat_port;
	}
	ret = pkt6_rewrite(skb, p, saddr, sport, ct.backend_addr, ct.backend_port);
	if (ret < 0)
		return ret;
	if (fib_rc < 0)
		fib_rc = fib6_lookup(skb, p, saddr, ct.backend_addr, &fib);
	return fib_redirect(skb, &fib, fib_rc);
}

static __always_inline int __np6_reply(struct __sk_buff *skb, const struct pkt6 *p, const struct np_config *cfg,
				       bool ingress)
{
	struct bpf_fib_lookup fib;
	struct tuple6 rkey = {};
	struct tuple6 ckey;
	struct nat6_entry nat;
	struct nat6_entry *found;
	struct ct6_entry *ct;
	__u64 now;
	int ret;

	__builtin_memcpy(rkey.saddr, p->saddr, 16);
	__builtin_memcpy(rkey.daddr, p->daddr, 16);
	rkey.sport = p->sport;
	rkey.dport = p->dport;
	rkey.proto = p->proto;
	found = zp_snat6.lookup(&rkey);
	if (!found)
		return ZP_ENOTSVC;
	nat = *found;
	nat6_ct_key(&nat, p->proto, &ckey);
	ct = zp_ct6.lookup(&ckey);
	now = bpf_ktime_get_ns();
	if (!ct || ct->expires <= now || !__ip6_eq(ct->backend_addr, p->saddr) || ct->backend_port != p->sport) {
		zp_snat6.delete(&rkey);
		return ZP_ECTSTALE;
	}
	ct6_update(ct, cfg, p, true, now);
	ret = pkt6_rewrite(skb, p, nat.frontend_addr, nat.frontend_port, nat.client_addr, nat.client_port);
	if (ret < 0)
		return ret;
	np_count(ZP_REASON_REPLY);
	if (!ingress)
		return TC_ACT_OK;
	ret = fib6_lookup(skb, p, nat.frontend_addr, nat.client_addr, &fib);
	return fib_redirect(skb, &fib, ret);
}

/* The IPv6 path runs as programs of its own, tail-called from the TC entry points (bcc 0.26
 * cannot link BPF-to-BPF calls, and one program holding both families, or both halves of the
 * IPv6 one, exceeds the 512-byte stack): zp_np6_ingress handles replies and hands anything
 * else to zp_np6_service; zp_np6_egress handles replies of local backends. */
BPF_PROG_ARRAY(zp_np6_progs, 3);
#define ZP_NP6_INGRESS 0
#define ZP_NP6_SERVICE 1
#define ZP_NP6_EGRESS  2

static __always_inline int np6_ingress(struct __sk_buff *skb)
{
	const struct np_config *cfg = __np_config();
	struct pkt6 p = {};
	int ret;

	if (!cfg || pkt6_parse(skb, &p) < 0)
		return TC_ACT_OK;
	ret = __np6_reply(skb, &p, cfg, true);
	if (ret == ZP_ENOTSVC) {
		zp_np6_progs.call(skb, ZP_NP6_SERVICE);
		return TC_ACT_OK; /* not loaded (yet): the packet goes on untranslated */
	}
	return __np_verdict(ret);
}

static __always_inline int np6_service(struct __sk_buff *skb)
{
	const struct np_config *cfg = __np_config();
	struct pkt6 p = {};

	if (!cfg || pkt6_parse(skb, &p) < 0)
		return TC_ACT_OK;
	return __np_verdict(__np6_service(skb, &p, cfg));
}

static __always_inline int np6_egress(struct __sk_buff *skb)
{
	const struct np_config *cfg = __np_config();
	struct pkt6 p = {};

	if (!cfg || pkt6_parse(skb, &p) < 0)
		return TC_ACT_OK;
	return __np_verdict(__np6_reply(skb, &p, cfg, false));
}

#endif
