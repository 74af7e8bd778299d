/* Forwarding from TC: a FIB lookup picks the device and next hop, then the packet is redirected
 * there directly. The node's stack never routes a translated packet, which matters for replies:
 * a packet whose new source is the node's own address would be dropped as martian. */
#ifndef ZP_FIB_H
#define ZP_FIB_H

#include "common.h"

/* bcc 0.26's helpers.h declares bpf_redirect_neigh with the 5.10 three-argument shape; the
 * kernel's takes four (ifindex, next-hop params, their size, flags). */
static long (*zp_redirect_neigh)(__u32 ifindex, struct bpf_redir_neigh *params, int plen,
				 __u64 flags) = (void *)BPF_FUNC_redirect_neigh;

/* Route saddr -> daddr as if the packet had arrived on skb's device; returns BPF_FIB_LKUP_RET_*.
 * tot_len stays 0 so the kernel checks the MTU against the skb itself, GSO included. */
static __always_inline int fib4_lookup(struct __sk_buff *skb, const struct pkt4 *p, __be32 saddr,
				       __be32 daddr, struct bpf_fib_lookup *fib)
{
	__builtin_memset(fib, 0, sizeof(*fib));
	fib->family = ZP_AF_INET;
	fib->l4_protocol = p->proto;
	fib->ifindex = skb->ifindex;
	fib->ipv4_src = saddr;
	fib->ipv4_dst = daddr;
	return bpf_fib_lookup(skb, fib, sizeof(*fib), 0);
}

/* Send the packet where fib4_lookup / fib6_lookup said (fib->family tells which). With a
 * resolved neighbour the MACs are written here (so tests can see them); otherwise the kernel
 * resolves the next hop (bpf_redirect_neigh). Returns a TC verdict, or ZP_EFIB / ZP_EREWRITE. */
static __always_inline int fib_redirect(struct __sk_buff *skb, struct bpf_fib_lookup *fib, int rc)
{
	struct bpf_redir_neigh nh = {};

	if (rc == BPF_FIB_LKUP_RET_SUCCESS) {
		if (bpf_skb_store_bytes(skb, 0, fib->dmac, ETH_ALEN, 0) < 0 ||
		    bpf_skb_store_bytes(skb, ETH_ALEN, fib->smac, ETH_ALEN, 0) < 0)
			return ZP_EREWRITE;
		return bpf_redirect(fib->ifindex, 0);
	}
	if (rc == BPF_FIB_LKUP_RET_NO_NEIGH) {
		/* the gateway, or the destination when directly attached */
		nh.nh_family = fib->family;
		if (fib->family == ZP_AF_INET6)
			__builtin_memcpy(nh.ipv6_nh, fib->ipv6_dst, 16);
		else
			nh.ipv4_nh = fib->ipv4_dst;
		return zp_redirect_neigh(fib->ifindex, &nh, sizeof(nh), 0);
	}
	return ZP_EFIB;
}

#endif
