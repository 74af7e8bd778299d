/* North-south load balancing on a node's external devices: NodePort, ExternalIP and
 * LoadBalancer IP frontends, with conntrack, SNAT for remote backends and the reply path.
 *
 * Ingress (packets arriving at the node):
 *   1. a reply of a translated flow (zp_snat4 hit): restore frontend -> client, redirect out;
 *   2. a packet to an external frontend: look up / create the flow, DNAT to its backend, SNAT
 *      to the node address of the egress device when that backend is remote, redirect out;
 *   3. anything else: untouched, to the stack.
 * Egress (packets leaving the node): replies of local backends, which the stack routed here
 * with the pod's address as source, get the frontend address back.
 *
 * Frontends share the socket path's service maps (lib/lb.h). Userspace writes NodePort
 * frontends once per node address that accepts NodePorts (nodePortAddresses), so the kernel
 * matches them with one exact lookup; ZP_SVC_F_EXTERNAL marks the frontends the TC path serves
 * (a ClusterIP arriving from outside is left alone). Its own maps (devices, counters) are in
 * maps.h, under ZP_MAPS_NODEPORT. */
#ifndef ZP_NODEPORT_H
#define ZP_NODEPORT_H

#include "lb.h"
#include "csum.h"
#include "fib.h"
#include "conntrack.h"
#include "nat.h"

/* Whether the backend a flow was pinned to still exists (same id, same address). */
static __always_inline bool __np4_backend_alive(const struct ct4_entry *ct)
{
	__u32 id = ct->backend_id;
	struct lb4_backend *be = zp_lb4_be.lookup(&id);

	return be && be->address == ct->backend_addr && be->port == ct->backend_port;
}

/* A flow's hash, the same on every node (no per-boot seed): Bob Jenkins' final mix over the
 * 5-tuple, as the kernel's jhash_3words. */
static __always_inline __u32 __rol32(__u32 w, int s) { return (w << s) | (w >> (32 - s)); }

static __always_inline __u32 np4_flow_hash(const struct pkt4 *p)
{
	__u32 a = bpf_ntohl(p->saddr), b = bpf_ntohl(p->daddr);
	__u32 c = ((__u32)bpf_ntohs(p->sport) << 16 | bpf_ntohs(p->dport)) ^ p->proto;

	a += 0xdeadbeef + 12; b += 0xdeadbeef + 12; c += 0xdeadbeef + 12;
	c ^= b; c -= __rol32(b, 14);
	a ^= c; a -= __rol32(c, 11);
	b ^= a; b -= __rol32(a, 25);
	c ^= b; c -= __rol32(b, 16);
	a ^= c; a -= __rol32(c, 4);
	b ^= a; b -= __rol32(a, 14);
	c ^= b; c -= __rol32(b, 24);
	return c;
}

/* Maglev: the backend the service port's table gives this flow. ZP_ENOTSVC when there is no
 * table (not written yet) or its entry names a backend that is gone: the caller then picks at
 * random, as before the table existed. */
static __always_inline int np4_select_maglev(const struct lb4_key *key, const struct lb_service *svc,
					     const struct pkt4 *p, struct lb4_backend *be, __u32 *chosen_id)
{
	struct maglev_key mkey = {};
	struct lb4_backend *found;
	__u32 index = np4_flow_hash(p) % ZP_MAGLEV_M;
	__u32 *id;
	void *table;

	if (svc->count == 0)
		return ZP_ENOBACKEND;
	mkey.rev_nat_id = svc->rev_nat_id;
	mkey.scope = key->scope;
	table = zp_maglev.lookup(&mkey);
	if (!table)
		return ZP_ENOTSVC;
	id = bpf_map_lookup_elem(table, &index);
	if (!id || !*id)
		return ZP_ENOTSVC;
	found = zp_lb4_be.lookup(id);
	if (!found)
		return ZP_ENOTSVC;
	*be = *found;
	*chosen_id = *id;
	return ZP_OK;
}

/* Create the flow of a first packet: pick a backend, decide on SNAT, write both entries. */
static __always_inline int __np4_new_flow(struct __sk_buff *skb, const struct pkt4 *p,
					  const struct np_config *cfg, const struct tuple4 *fwd,
					  struct lb4_key *key, const struct lb_service *svc,
					  struct ct4_entry *ct, struct bpf_fib_lookup *fib, int *fib_rc,
					  __u64 now)
{
	__u32 svc_flags = svc->flags;
	struct nat4_entry nat = {};
	struct tuple4 rkey = {};
	struct lb4_backend be;
	struct np_dev4 *dev;
	__u32 backend_id = 0;
	__u32 out_ifindex;
	int ret;

	if (p->proto == IPPROTO_TCP && !__tcp_new_syn(p))
		return ZP_ECTMISS;
	/* ClientIP affinity by the client's address (what kube-proxy's "recent" match keys on);
	 * else Maglev when asked for (the same backend on every node); else at random */
	ret = ZP_ENOTSVC;
	if ((svc_flags & ZP_SVC_F_MAGLEV) && !svc->affinity_timeout)
		ret = np4_select_maglev(key, svc, p, &be, &backend_id);
	if (ret == ZP_ENOTSVC)
		ret = lb4_select_backend_sticky(key, svc, &be, lb_affinity_tc_client(p->saddr), &backend_id);
	if (ret == ZP_ENOBACKEND && (svc_flags & ZP_SVC_F_NODEPORT))
		return ZP_EREFUSE;
	if (ret < 0)
		return ret;

	*fib_rc = fib4_lookup(skb, p, p->saddr, be.address, fib);
	if (*fib_rc != BPF_FIB_LKUP_RET_SUCCESS && *fib_rc != BPF_FIB_LKUP_RET_NO_NEIGH)
		return ZP_EFIB;
	out_ifindex = fib->ifindex;
	dev = zp_np_dev4.lookup(&out_ifindex);

	__builtin_memset(ct, 0, sizeof(*ct));
	ct->backend_addr = be.address;
	ct->backend_port = be.port;
	ct->backend_id = backend_id;
	ct->rev_nat_id = svc->rev_nat_id;
	nat.client_addr = p->saddr;
	nat.client_port = p->sport;
	nat.frontend_addr = p->daddr;
	nat.frontend_port = p->dport;
	rkey.saddr = be.address;
	rkey.sport = be.port;
	rkey.proto = p->proto;
	if (dev && !(svc_flags & ZP_SVC_F_LOCAL)) {
		/* Remote backend: its replies must come back through this node. */
		nat.flags = ZP_NAT_F_SNAT;
		rkey.daddr = dev->addr;
		ret = snat4_alloc(cfg, fwd, &rkey, &nat, now);
		if (ret < 0)
			return ret;
		ct->snat_addr = rkey.daddr;
		ct->snat_port = rkey.dport;
		ct->flags = ZP_CT_F_SNAT;
	} else {
		rkey.daddr = p->saddr;
		rkey.dport = p->sport;
		if (zp_snat4.update(&rkey, &nat) < 0)
			return ZP_EMAPWRITE;
	}
	ct4_update(ct, cfg, p, false, now);
	if (zp_ct4.update((void *)fwd, ct) < 0) {
		zp_snat4.delete(&rkey);
		return ZP_EMAPWRITE;
	}
	np_count(ZP_REASON_NEW_FLOW);
	return ZP_OK;
}

/* A packet to an external frontend: translate it along its flow and send it to the backend. */
static __always_inline int __np4_service(struct __sk_buff *skb, const struct pkt4 *p,
					 const struct np_config *cfg)
{
	struct bpf_fib_lookup fib;
	struct lb4_key key;
	struct lb_service *svc;
	struct ct4_entry *found;
	struct ct4_entry ct;
	struct tuple4 fwd = {};
	__be32 saddr = p->saddr;
	__be16 sport = p->sport;
	int fib_rc = -1;
	__u64 now;
	int ret;

	svc = lb4_lookup_external(p->daddr, p->dport, p->proto, &key);
	if (!svc || !(svc->flags & ZP_SVC_F_EXTERNAL))
		return ZP_ENOTSVC;
	/* every packet, not only a flow's first: narrowed ranges cut flows already under way */
	if ((svc->flags & ZP_SVC_F_SRC_RANGE) && !lb4_src_range_ok(svc->rev_nat_id, p->saddr))
		return ZP_ESRCRANGE;
	fwd.saddr = p->saddr;
	fwd.daddr = p->daddr;
	fwd.sport = p->sport;
	fwd.dport = p->dport;
	fwd.proto = p->proto;
	now = bpf_ktime_get_ns();

	found = zp_ct4.lookup(&fwd);
	if (found && ct4_live(found, p, now) && !__np4_backend_alive(found)) {
		/* The flow's backend was deleted. TCP mid-stream must not land on another backend
		 * (which would only answer with RST after the client sent data it never saw): drop,
		 * so the client times out or gives up. A UDP flow or a new SYN starts over. */
		nat4_forget(&fwd, found);
		if (p->proto == IPPROTO_TCP && !__tcp_new_syn(p))
			return ZP_ECTGONE;
		found = NULL;
	} else if (found && !ct4_live(found, p, now)) {
		nat4_forget(&fwd, found); /* frees its SNAT port now rather than at eviction */
		found = NULL;
	}
	if (found) {
		ct4_update(found, cfg, p, false, now);
		ct = *found;
		np_count(ZP_REASON_FWD);
	} else {
		ret = __np4_new_flow(skb, p, cfg, &fwd, &key, svc, &ct, &fib, &fib_rc, now);
		if (ret < 0)
			return ret;
	}

	if (ct.flags & ZP_CT_F_SNAT) {
		saddr = ct.snat_addr;
		sport = ct.snat_port;
	}
	ret = pkt4_rewrite(skb, p, saddr, sport, ct.backend_addr, ct.backend_port);
	if (ret < 0)
		return ret;
	if (fib_rc < 0)
		fib_rc = fib4_lookup(skb, p, saddr, ct.backend_addr, &fib);
	return fib_redirect(skb, &fib, fib_rc);
}

/* A reply of a translated flow: give it the frontend as source and the client as destination.
 * At ingress (SNATed replies from another node) it is redirected to the client; at egress
 * (local backends, already routed by the stack) it continues on its way. */
static __always_inline int __np4_reply(struct __sk_buff *skb, const struct pkt4 *p,
				       const struct np_config *cfg, bool ingress)
{
	struct bpf_fib_lookup fib;
	struct tuple4 rkey = {};
	struct tuple4 ckey;
	struct nat4_entry nat;
	struct nat4_entry *found;
	struct ct4_entry *ct;
	__u64 now;
	int ret;

	rkey.saddr = p->saddr;
	rkey.daddr = p->daddr;
	rkey.sport = p->sport;
	rkey.dport = p->dport;
	rkey.proto = p->proto;
	found = zp_snat4.lookup(&rkey);
	if (!found)
		return ZP_ENOTSVC;
	nat = *found;
	nat4_ct_key(&nat, p->proto, &ckey);
	ct = zp_ct4.lookup(&ckey);
	now = bpf_ktime_get_ns();
	if (!ct || ct->expires <= now || ct->backend_addr != p->saddr || ct->backend_port != p->sport) {
		zp_snat4.delete(&rkey);
		return ZP_ECTSTALE;
	}
	ct4_update(ct, cfg, p, true, now);
	ret = pkt4_rewrite(skb, p, nat.frontend_addr, nat.frontend_port, nat.client_addr, nat.client_port);
	if (ret < 0)
		return ret;
	np_count(ZP_REASON_REPLY);
	if (!ingress)
		return TC_ACT_OK;
	ret = fib4_lookup(skb, p, nat.frontend_addr, nat.client_addr, &fib);
	return fib_redirect(skb, &fib, ret);
}

/* The one place that turns an inner result into a TC verdict and counts failures. */
static __always_inline int __np_verdict(int ret)
{
	if (ret >= 0)
		return ret; /* a verdict already (TC_ACT_OK or a redirect) */
	switch (ret) {
	case ZP_ENOTSVC:
		return TC_ACT_OK;
	case ZP_EREFUSE:
		np_count(ZP_REASON_NO_BACKEND);
		return TC_ACT_OK; /* nothing listens on a node address's NodePort: RST / ICMP */
	case ZP_ENOBACKEND:
		np_count(ZP_REASON_NO_BACKEND);
		break;
	case ZP_ENOSNATPORT:
		np_count(ZP_REASON_SNAT_EXHAUSTED);
		break;
	case ZP_ECTGONE:
		np_count(ZP_REASON_BACKEND_GONE);
		break;
	case ZP_ECTMISS:
		np_count(ZP_REASON_CT_MISS);
		break;
	case ZP_EFIB:
		np_count(ZP_REASON_FIB_FAIL);
		break;
	case ZP_EREWRITE:
		np_count(ZP_REASON_REWRITE_FAIL);
		break;
	case ZP_EMAPWRITE:
		np_count(ZP_REASON_MAP_WRITE);
		break;
	case ZP_ECTSTALE:
		np_count(ZP_REASON_STALE_REPLY);
		return TC_ACT_OK;
	case ZP_ESTALE:
		np_count(ZP_REASON_STALE_BACKEND);
		break;
	case ZP_ESRCRANGE:
		np_count(ZP_REASON_SRC_RANGE);
		break;
	default:
		np_count(ZP_REASON_UNKNOWN); /* a code added without a case here: dropped, and visible */
		break;
	}
	return TC_ACT_SHOT;
}

static __always_inline const struct np_config *__np_config(void)
{
	__u32 zero = 0;
	struct np_config *cfg = zp_np_cfg.lookup(&zero);

	if (!cfg || cfg->snat_port_min == 0 || cfg->snat_port_max < cfg->snat_port_min)
		return NULL; /* not configured yet: translate nothing rather than guess */
	return cfg;
}

static __always_inline int np4_ingress(struct __sk_buff *skb)
{
	const struct np_config *cfg = __np_config();
	struct pkt4 p = {};
	int ret;

	if (!cfg || pkt4_parse(skb, &p) < 0)
		return TC_ACT_OK;
	ret = __np4_reply(skb, &p, cfg, true);
	if (ret == ZP_ENOTSVC)
		ret = __np4_service(skb, &p, cfg);
	return __np_verdict(ret);
}

static __always_inline int np4_egress(struct __sk_buff *skb)
{
	const struct np_config *cfg = __np_config();
	struct pkt4 p = {};

	if (!cfg || pkt4_parse(skb, &p) < 0)
		return TC_ACT_OK;
	return __np_verdict(__np4_reply(skb, &p, cfg, false));
}

#endif
