/* TC programs on a node's external devices (clsact ingress and egress): NodePort, ExternalIP
 * and LoadBalancer IP frontends for traffic from outside the node. All logic is in
 * lib/nodeport.h and the headers it includes. IPv4 only; IPv6 passes untouched. */
#define ZP_MAPS_LB 1       /* maps.h: the service maps, shared with the socket hooks */
#define ZP_MAPS_NODEPORT 1 /* maps.h: conntrack, SNAT, devices, settings, counters */
#include "lib/nodeport.h"

int zp_np4_ingress(struct __sk_buff *skb) { return np4_ingress(skb); }
int zp_np4_egress(struct __sk_buff *skb) { return np4_egress(skb); }
