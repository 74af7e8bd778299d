/* Packet access for the TC programs: parse an IPv4 TCP/UDP header into a tuple, and rewrite
 * addresses and ports with the IP and L4 checksums fixed incrementally.
 *
 * Everything goes through bpf_skb_load_bytes / bpf_skb_store_bytes and the csum helpers, never
 * through direct packet pointers: the verifier invalidates those after every store, and a
 * 64 KiB GSO packet may not have its L4 header in the linear area anyway. */
#ifndef ZP_CSUM_H
#define ZP_CSUM_H

#include "common.h"
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/pkt_cls.h>

/* Byte offsets in an Ethernet + IPv4 frame (the TC programs run on Ethernet devices only). */
#define ZP_IP4_OFF       ETH_HLEN
#define ZP_IP4_CSUM_OFF  (ETH_HLEN + 10)
#define ZP_IP4_SADDR_OFF (ETH_HLEN + 12)
#define ZP_IP4_DADDR_OFF (ETH_HLEN + 16)
#define ZP_TCP_CSUM      16          /* offset of the checksum in the TCP header */
#define ZP_UDP_CSUM      6           /* offset of the checksum in the UDP header */
#define ZP_TCP_FLAGS     13          /* offset of the flags byte in the TCP header */

#define ZP_TCP_FIN 0x01
#define ZP_TCP_SYN 0x02
#define ZP_TCP_RST 0x04
#define ZP_TCP_ACK 0x10

/* What the programs need of one packet. */
struct pkt4 {
	__be32 saddr;     /* IPv4 source, network byte order */
	__be32 daddr;     /* IPv4 destination, network byte order */
	__be16 sport;     /* L4 source port, network byte order */
	__be16 dport;     /* L4 destination port, network byte order */
	__u32 l4_off;     /* offset of the TCP/UDP header from the start of the frame */
	__u8 proto;       /* IPPROTO_TCP / IPPROTO_UDP */
	__u8 tcp_flags;   /* TCP flags byte (ZP_TCP_*); 0 for UDP */
	__u8 pad[2];      /* explicit padding */
};

/* Fill *p from the frame; ZP_ENOTSVC for anything but an unfragmented IPv4 TCP/UDP packet
 * (fragments carry no ports after the first; they are left to the stack). */
static __always_inline int pkt4_parse(struct __sk_buff *skb, struct pkt4 *p)
{
	struct iphdr ip;
	__be16 ports[2];

	if (skb->protocol != bpf_htons(ETH_P_IP))
		return ZP_ENOTSVC;
	if (bpf_skb_load_bytes(skb, ZP_IP4_OFF, &ip, sizeof(ip)) < 0)
		return ZP_ENOTSVC;
	if (ip.version != 4 || ip.ihl < 5)
		return ZP_ENOTSVC;
	if (ip.frag_off & bpf_htons(0x3fff)) /* MF or a fragment offset */
		return ZP_ENOTSVC;
	if (ip.protocol != IPPROTO_TCP && ip.protocol != IPPROTO_UDP)
		return ZP_ENOTSVC;
	p->saddr = ip.saddr;
	p->daddr = ip.daddr;
	p->proto = ip.protocol;
	p->l4_off = ZP_IP4_OFF + ip.ihl * 4;
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

static __always_inline int
__csum4_set_addr(struct __sk_buff *skb, const struct pkt4 *p, __u32 off, __be32 from, __be32 to)
{
	__u32 csum_off = p->l4_off + (p->proto == IPPROTO_TCP ? ZP_TCP_CSUM : ZP_UDP_CSUM);
	/* A UDP checksum of 0 means "none" and must stay 0 (BPF_F_MARK_MANGLED_0). */
	__u64 l4_flags = (p->proto == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0) | BPF_F_PSEUDO_HDR;

	if (from == to)
		return ZP_OK;
	if (bpf_l4_csum_replace(skb, csum_off, from, to, l4_flags | sizeof(to)) < 0)
		return ZP_EREWRITE;
	if (bpf_l3_csum_replace(skb, ZP_IP4_CSUM_OFF, from, to, sizeof(to)) < 0)
		return ZP_EREWRITE;
	if (bpf_skb_store_bytes(skb, off, &to, sizeof(to), 0) < 0)
		return ZP_EREWRITE;
	return ZP_OK;
}

/* A port rewrite: the same for both families (ports are not in the pseudo-header). */
static __always_inline int
__csum_set_port(struct __sk_buff *skb, __u32 l4_off, __u8 proto, __u32 off, __be16 from, __be16 to)
{
	__u32 csum_off = l4_off + (proto == IPPROTO_TCP ? ZP_TCP_CSUM : ZP_UDP_CSUM);
	__u64 l4_flags = proto == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0;

	if (from == to)
		return ZP_OK;
	if (bpf_l4_csum_replace(skb, csum_off, from, to, l4_flags | sizeof(to)) < 0)
		return ZP_EREWRITE;
	if (bpf_skb_store_bytes(skb, off, &to, sizeof(to), 0) < 0)
		return ZP_EREWRITE;
	return ZP_OK;
}

/* Rewrite the packet's addresses and ports to the given ones (unchanged fields cost nothing). */
static __always_inline int pkt4_rewrite(struct __sk_buff *skb, const struct pkt4 *p, __be32 saddr,
					__be16 sport, __be32 daddr, __be16 dport)
{
	if (__csum4_set_addr(skb, p, ZP_IP4_SADDR_OFF, p->saddr, saddr) < 0 ||
	    __csum4_set_addr(skb, p, ZP_IP4_DADDR_OFF, p->daddr, daddr) < 0 ||
	    __csum_set_port(skb, p->l4_off, p->proto, p->l4_off, p->sport, sport) < 0 ||
	    __csum_set_port(skb, p->l4_off, p->proto, p->l4_off + 2, p->dport, dport) < 0)
		return ZP_EREWRITE;
	return ZP_OK;
}

#endif
