/* TC programs on a node's external devices (clsact ingress and egress): NodePort, ExternalIP
 * and LoadBalancer IP frontends for traffic from outside the node, IPv4 (lib/nodeport.h) and
 * IPv6 (lib/nodeport6.h, its own programs, tail-called from here). The entry points keep their
 * first names (zp_np4_*): a restarted agent recognises and replaces the filters an earlier one
 * attached under them. */
#define ZP_MAPS_LB 1       /* maps.h: the service maps, shared with the socket hooks */
#define ZP_MAPS_NODEPORT 1 /* maps.h: conntrack, SNAT, devices, settings, counters */
#include "lib/nodeport6.h"

int zp_np4_ingress(struct __sk_buff *skb)
{
	if (skb->protocol == bpf_htons(ETH_P_IPV6)) {
		zp_np6_progs.call(skb, ZP_NP6_INGRESS);
		return TC_ACT_OK; /* the IPv6 programs are not in place (yet): untranslated */
	}
	return np4_ingress(skb);
}

int zp_np4_egress(struct __sk_buff *skb)
{
	if (skb->protocol == bpf_htons(ETH_P_IPV6)) {
		zp_np6_progs.call(skb, ZP_NP6_EGRESS);
		return TC_ACT_OK;
	}
	return np4_egress(skb);
}

int zp_np6_ingress(struct __sk_buff *skb) { return np6_ingress(skb); }
int zp_np6_service(struct __sk_buff *skb) { return np6_service(skb); }
int zp_np6_egress(struct __sk_buff *skb) { return np6_egress(skb); }
