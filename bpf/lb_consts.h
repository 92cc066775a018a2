/* SPDX-License-Identifier: GPL-2.0 */
/* Constants of the xdplb data path: protocol numbers, sizes, defaults. */
#ifndef XDPLB_CONSTS_H
#define XDPLB_CONSTS_H

#include <linux/in.h>

#define ETH_ALEN 6
#define ETH_HLEN 14
#define ETH_P_IP 0x0800
#define ETH_P_IPV6 0x86DD

#define IPV4_HLEN 20
#define IPV6_HLEN 40
#define UDP_HLEN 8

#define IPPROTO_IPV6_ENC 41 /* IPv6-in-IP (IPPROTO_IPV6) */
#define NEXTHDR_FRAGMENT 44

#define LB_TCP_SYN 0x02 /* in byte 13 of the TCP header */
#define LB_TCP_ACK 0x10
#define IP_MF 0x2000
#define IP_DF 0x4000
#define IP_OFFMASK 0x1FFF

#define OUTER_TTL 64

#define ICMP_HLEN 8
/* ICMPv4 types and codes (linux/icmp.h drags in libc headers) */
#define ICMP_ECHOREPLY 0
#define ICMP_DEST_UNREACH 3
#define ICMP_FRAG_NEEDED 4 /* code of ICMP_DEST_UNREACH */
#define ICMP_ECHO 8
#define ICMP_TIME_EXCEEDED 11
/* Quotes in the ICMP errors we send: RFC 1812 4.3.2.3 (the ICMP datagram at most 576
 * bytes) and RFC 4443 2.4(c) (at most the minimum IPv6 MTU, 1280). */
#define ICMP4_QUOTE_MAX (576 - IPV4_HLEN - ICMP_HLEN)
#define ICMP6_QUOTE_MAX (1280 - IPV6_HLEN - ICMP_HLEN)
#define IPV4_MIN_MTU 68
#define IPV6_MIN_MTU 1280

/* GUE (direct IP-in-UDP, "variant 1") source ports are taken from the flow hash in the
 * ephemeral range, so receivers' RSS spreads flows. */
#define GUE_SPORT_BASE 0xC000
#define GUE_SPORT_MASK 0x3FFF

/* Hash seeds: the Python mirror (lb/flowhash.py) uses the same values. */
#define FLOW_HASH_SEED 0x8F0A5C31u
#define PREFILTER_MULT 0x9E3779B1u

/* Default map sizes; user space may resize them between open and load. */
#define LB_MAX_VIPS 4096
#define LB_VIP_INDEX_SLOTS 8192 /* slots of vip_index: a power of two, 2 x max VIPs */
#define LB_MAX_BACKENDS 65536
#define LB_MAX_NEXTHOPS 4096
#define LB_FLOW_TABLE_SIZE 65536
#define LB_DEFAULT_RING_SIZE 65537
#define LB_RING_CHUNK 16 /* backend ids per ring element: a cache line (a power of two) */
#define LB_RING_CHUNK16 64 /* the same with 16-bit ids (max backends <= 65536) */
#define LB_PREFILTER_WORDS 1024 /* 65536 bits */
#define LB_FLOW_WAYS 8 /* slots per bucket of the connection table (a power of two) */
#define LB_QUIC_FILTER_WORDS 4096 /* 65536 four-bit entries, see quic.h */
#define LB_MAX_QUIC_SERVERS 65536
#define LB_QUIC_CACHE_SLOTS 1024 /* per CPU, a power of two */
#define ONE_SEC_NS 1000000000ULL

#endif
