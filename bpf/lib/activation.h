/* Scale to zero: which connections of an opted-in pod the activation proxy takes over.
 *
 * One sk_lookup program (bpf/sk_lookup.c) is linked into the network namespace of every
 * opted-in pod of the node. For a SYN to one of the app's ports it looks up the pod's slot; if
 * the pod's redirect flag is on (checkpointed, dumping or restoring) it assigns the connection
 * to the activation proxy's listener, which lives in the same namespace. With the flag off it
 * only counts the attempt (idle detection) and the kernel's normal lookup finds the app.
 *
 * Userspace (scaletozero/sklookup.py) owns slots and every write; ctypes mirrors of the map
 * structs live there and a test checks their sizes against bcc's. The maps and their structs
 * are in maps.h (ZP_MAPS_S2Z); inner results are common.h's codes (ZP_OK = assigned). */
#ifndef ZP_ACTIVATION_H
#define ZP_ACTIVATION_H

#include "maps.h"

#ifndef ZP_MAPS_S2Z
#error "lib/activation.h needs scale to zero's maps: define ZP_MAPS_S2Z before the first #include"
#endif

#endif
