/* Service lookup and backend selection, shared by the socket hooks (and later the TC programs).
 * The kernel only looks up: userspace owns ids, slots and counts. */
#ifndef ZP_LB_H
#define ZP_LB_H

#include "maps.h"

#ifndef ZP_MAPS_LB
#error "lib/lb.h needs the service maps: define ZP_MAPS_LB before the first #include"
#endif

/* Pick a slot in 1..count at random; count must be > 0. */
static __always_inline __u16 __lb_pick_slot(__u16 count)
{
	return (__u16)(bpf_get_prandom_u32() % count) + 1;
}

/* Look up the frontend (slot 0) of addr:port/proto. */
static __always_inline struct lb_service *
lb4_lookup_service(__be32 addr, __be16 port, __u8 proto, struct lb4_key *key)
{
	__builtin_memset(key, 0, sizeof(*key));
	key->address = addr;
	key->dport = port;
	key->proto = proto;
	return zp_lb4_svc.lookup(key);
}

/* The frontend as traffic from outside the node sees it: its external entry when it has one. */
static __always_inline struct lb_service *
lb4_lookup_external(__be32 addr, __be16 port, __u8 proto, struct lb4_key *key)
{
	struct lb_service *svc = lb4_lookup_service(addr, port, proto, key);

	if (svc && (svc->flags & ZP_SVC_F_SCOPED)) {
		key->scope = ZP_SCOPE_EXTERNAL;
		svc = zp_lb4_svc.lookup(key);
	}
	return svc;
}

/* loadBalancerSourceRanges: whether a source may use a ZP_SVC_F_SRC_RANGE frontend. */
static __always_inline bool lb4_src_range_ok(__u16 rev_nat_id, __be32 saddr)
{
	struct lb4_src_key key = {};

	key.prefixlen = ZP_SRC_RANGE_PREFIX + 32;
	key.rev_nat_id = rev_nat_id;
	__builtin_memcpy(key.address, &saddr, 4);
	return zp_lb4_src.lookup(&key) != NULL;
}

static __always_inline bool lb6_src_range_ok(__u16 rev_nat_id, const __u8 saddr[16])
{
	struct lb6_src_key key = {};

	key.prefixlen = ZP_SRC_RANGE_PREFIX + 128;
	key.rev_nat_id = rev_nat_id;
	__builtin_memcpy(key.address, saddr, 16);
	return zp_lb6_src.lookup(&key) != NULL;
}

/* The affinity id (lb_affinity_key.netns_cookie) of a client the TC path sees: its IPv4 address
 * in the union's TC half. */
static __always_inline __u64 lb_affinity_tc_client(__be32 addr)
{
	struct lb_affinity_key akey = {};

	akey.client_ip4 = addr;
	akey.tc_client = ZP_AFFINITY_TC_CLIENT;
	return akey.netns_cookie;
}

/* ClientIP session affinity: the backend this client used last, if still fresh and present. */
static __always_inline struct lb4_backend *
lb4_affinity_backend(const struct lb_service *svc, __u64 client, __u32 *backend_id)
{
	struct lb_affinity_key akey = {};
	struct lb_affinity_value *aval;
	struct lb4_backend *found;
	__u64 now;

	akey.netns_cookie = client;
	akey.rev_nat_id = svc->rev_nat_id;
	akey.family = 4;
	aval = zp_lb_affinity.lookup(&akey);
	if (!aval)
		return NULL;
	now = bpf_ktime_get_ns();
	if (now - aval->last_used_ns > (__u64)svc->affinity_timeout * 1000000000ULL)
		return NULL;
	found = zp_lb4_be.lookup(&aval->backend_id);
	if (found) {
		aval->last_used_ns = now;
		*backend_id = aval->backend_id;
	}
	return found;
}

static __always_inline void lb_affinity_remember(const struct lb_service *svc, __u64 client, __u8 family,
						 __u32 backend_id)
{
	struct lb_affinity_key akey = {};
	struct lb_affinity_value aval = {};

	akey.netns_cookie = client;
	akey.rev_nat_id = svc->rev_nat_id;
	akey.family = family;
	aval.last_used_ns = bpf_ktime_get_ns();
	aval.backend_id = backend_id;
	zp_lb_affinity.update(&akey, &aval);
}

/* Choose a backend of the service found by lb4_lookup_service/lb4_lookup_external (key still
 * holds its frontend) at random, or the client's last one under ClientIP affinity (slot 0's
 * affinity_timeout; client = its lb_affinity_key.netns_cookie, 0 = unknown). *chosen_id gets the backend's id
 * (conntrack keeps it to notice a deleted backend later). ZP_OK, ZP_ENOBACKEND or ZP_ESTALE. */
static __always_inline int
lb4_select_backend_sticky(struct lb4_key *key, const struct lb_service *svc, struct lb4_backend *be,
			  __u64 client, __u32 *chosen_id)
{
	struct lb4_backend *found;
	struct lb_service *slot;
	__u32 backend_id = 0;

	if (svc->count == 0)
		return ZP_ENOBACKEND;
	if (svc->affinity_timeout && client) {
		found = lb4_affinity_backend(svc, client, &backend_id);
		if (found) {
			*be = *found;
			*chosen_id = backend_id;
			return ZP_OK;
		}
	}
	key->slot = __lb_pick_slot(svc->count);
	slot = zp_lb4_svc.lookup(key);
	if (!slot)
		return ZP_ESTALE;
	backend_id = slot->backend_id;
	found = zp_lb4_be.lookup(&backend_id);
	if (!found)
		return ZP_ESTALE;
	*be = *found;
	if (svc->affinity_timeout && client)
		lb_affinity_remember(svc, client, 4, backend_id);
	*chosen_id = backend_id;
	return ZP_OK;
}


static __always_inline struct lb_service *
lb6_lookup_service(const __u32 addr[4], __be16 port, __u8 proto, struct lb6_key *key)
{
	__builtin_memset(key, 0, sizeof(*key));
	__builtin_memcpy(key->address, addr, 16);
	key->dport = port;
	key->proto = proto;
	return zp_lb6_svc.lookup(key);
}

static __always_inline struct lb6_backend *
lb6_affinity_backend(const struct lb_service *svc, __u64 client, __u32 *backend_id)
{
	struct lb_affinity_key akey = {};
	struct lb_affinity_value *aval;
	struct lb6_backend *found;
	__u64 now;

	akey.netns_cookie = client;
	akey.rev_nat_id = svc->rev_nat_id;
	akey.family = 6;
	aval = zp_lb_affinity.lookup(&akey);
	if (!aval)
		return NULL;
	now = bpf_ktime_get_ns();
	if (now - aval->last_used_ns > (__u64)svc->affinity_timeout * 1000000000ULL)
		return NULL;
	found = zp_lb6_be.lookup(&aval->backend_id);
	if (found) {
		aval->last_used_ns = now;
		*backend_id = aval->backend_id;
	}
	return found;
}

static __always_inline int
lb6_select_backend_sticky(struct lb6_key *key, const struct lb_service *svc, struct lb6_backend *be,
			  __u64 client, __u32 *chosen_id)
{
	struct lb6_backend *found;
	struct lb_service *slot;
	__u32 backend_id = 0;

	if (svc->count == 0)
		return ZP_ENOBACKEND;
	if (svc->affinity_timeout && client) {
		found = lb6_affinity_backend(svc, client, &backend_id);
		if (found) {
			*be = *found;
			*chosen_id = backend_id;
			return ZP_OK;
		}
	}
	key->slot = __lb_pick_slot(svc->count);
	slot = zp_lb6_svc.lookup(key);
	if (!slot)
		return ZP_ESTALE;
	backend_id = slot->backend_id;
	found = zp_lb6_be.lookup(&backend_id);
	if (!found)
		return ZP_ESTALE;
	*be = *found;
	if (svc->affinity_timeout && client)
		lb_affinity_remember(svc, client, 6, backend_id);
	*chosen_id = backend_id;
	return ZP_OK;
}

#endif
