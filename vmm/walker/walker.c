/*
 * VMSAv8-64 translation walker (stage 1, stage 2, nested) and IOTLB for iommu-lab.
 *
 * Compiled by cffi (vmm/walker/build.py); the Python face is vmm/walker/__init__.py.
 * Rules follow docs/facts/pgtable.md sections 1-5 (ARM DDI0487 D8.2/D8.3/D8.4/D8.15):
 *
 *   per stage: input range -> TTBR address size -> per level { fetch (nested: the descriptor
 *   IPA goes through a full stage-2 walk first) -> valid -> reserved encoding -> address size
 *   -> NS } -> AF -> permission; nested: the final IPA then goes through stage 2.
 *
 * Robustness: every descriptor fetch is checked against the machine memory size, every
 * context id against WK_MAX_CTX; no input makes this code read outside the memfd mapping.
 *
 * IOTLB: direct-mapped, one probe per hit. Entries are "fractured" to 4 KiB input pages
 * (even for blocks and 16K/64K pages) and remember the leaf regions they came from (input
 * side and IPA side) so invalidation by range / by IPA removes everything an architectural
 * block entry would cover. Contexts carry a generation counter: redefining or invalidating a
 * context is O(1). Faults are never cached; a hit whose permissions do not allow the access
 * falls back to a full walk, so fault records are always exact.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define WK_MAX_CTX 1024u

/* stage format flags (mirrored in __init__.py) */
#define WK_F_S2 1u
#define WK_F_CHECK_AF 2u
#define WK_F_NS_CHECK 4u
#define WK_F_APTABLE 8u

/* fault kinds */
#define K_TRANSLATION 1u
#define K_ACCESS_FLAG 2u
#define K_PERMISSION 3u
#define K_ADDRESS_SIZE 4u
#define K_WALK_ABORT 5u
#define K_NS 6u
#define K_BAD_SUBSTREAM 7u   /* PASID tables: PASID >= 2^s1cdmax, or an L1 CD descriptor with V = 0 */
#define K_BAD_CD 8u          /* PASID tables: a CD that is not valid (V, T0SZ, TG0, ENDI, AA64) */

#define ACC_R 1u
#define ACC_W 2u

#define FW(kind, stage, level) ((uint32_t)(kind) | ((uint32_t)(stage) << 4) | ((uint32_t)(level) << 8))
#define FW_S1PTW (1u << 12)
/* PASID tables: which configuration fetch failed (bits 14:13): the L1 CD descriptor or the CD */
#define FETCH_L1 1u
#define FETCH_CD 2u
#define FW_FETCH(x) ((uint32_t)(x) << 13)

#define ADDR_47 0x0000FFFFFFFFFFFFull

struct wk_stage {
    uint64_t ttbr;
    uint32_t ia_bits;
    uint32_t start_level;
    uint32_t granule;
    uint32_t oa_bits;
    uint32_t flags;
};

/* A stage with everything the walk loop needs precomputed. */
struct stg {
    uint64_t root;       /* root table base (TTBR aligned down to the root size) */
    uint32_t ia_bits, oa_bits, g, sl, flags;
    uint32_t stride;     /* index bits per level: g - 3 */
    uint32_t bad;        /* inconsistent ia_bits/start level/concatenation: every access faults */
    uint32_t ttbr_bad;   /* TTBR >= 2^oa_bits */
    uint32_t ns_check, aptable;   /* stage-1 format checks in force */
    uint64_t next_mask;  /* table descriptor -> next table address (bits 47:g) */
    uint64_t next_bad;   /* table descriptor bits that put the next table beyond oa_bits */
    uint64_t idx_mask;   /* (1 << stride) - 1 */
};

struct tstate;

struct ctx {
    struct stg s1, s2;
    struct tstate *tbl;  /* a PASID-table context (wk_set_table), else NULL */
    uint32_t gen;        /* 0 never matches; bumped on redefinition/invalidation */
    uint32_t s2_id;
    uint8_t defined, has_s1, has_s2;
    uint8_t max_shift;   /* largest input leaf shift cached since the last generation bump */
    uint64_t salt;       /* spreads contexts over the TLB */
    /* nested: hull of the stage-1 table IPAs walked for cached entries since the last generation
     * bump; an IPA invalidation overlapping it flushes the context (its stage-1 walks went
     * through stage-2 translations that may have changed) */
    uint64_t tbl_lo, tbl_hi;
};

/* 32 bytes: two entries per cache line. Page-aligned addresses carry small fields in bits 11:0. */
struct tlbe {
    uint64_t page;       /* input address >> 12 */
    uint64_t tag;        /* gen << 32 | ctx; gen 0 never matches (invalid entry) */
    uint64_t out;        /* output MPA of that 4K page | perm (bits 1:0, R=1 W=2) | input leaf shift << 2 */
    uint64_t ipa;        /* IPA of that 4K page | stage-2 leaf shift (bits 5:0; 0 = no stage 2) */
};
#define TAG(gen, ctx) (((uint64_t)(gen) << 32) | (uint64_t)(ctx))
#define TAG_GEN(t) ((uint32_t)((t) >> 32))
#define TAG_CTX(t) ((uint32_t)(t))
#define E_PERM(e) ((uint32_t)(e)->out & 3u)
#define E_INSHIFT(e) ((uint32_t)((e)->out >> 2) & 63u)
#define E_IPASHIFT(e) ((uint32_t)(e)->ipa & 63u)
#define PAGE_BITS(x) ((x) & ~0xFFFull)

struct wk_walker {
    const uint8_t *mem;
    uint64_t size;
    uint64_t last;       /* size - 8: the highest address a descriptor fetch may read */
    struct tlbe *tlb;
    uint64_t mask;
    int tlb_on;
    uint64_t hits, misses, walks;
    struct ctx ctx[WK_MAX_CTX];
};

struct wres {
    uint64_t out;        /* output address on success */
    uint64_t faddr;      /* faulting input address (IOVA or IPA) */
    uint32_t perm;       /* allowed accesses of the leaf (with APTable) */
    uint32_t shift;      /* leaf region log2 */
    uint64_t tlo, thi;   /* nested stage 1: lowest/highest descriptor IPA fetched */
};

static inline uint32_t lvl_shift(uint32_t g, uint32_t l)
{
    return g + (3u - l) * (g - 3u);
}

static inline int block_allowed(uint32_t g, uint32_t l)
{
    if (g == 12)
        return l == 1 || l == 2;
    return l == 2;   /* 16K: 32M; 64K: 512M */
}

static void stage_setup(struct stg *s, const struct wk_stage *in, int is_stage2)
{
    uint32_t sh, root_bits, max_root;

    memset(s, 0, sizeof(*s));
    s->ia_bits = in->ia_bits;
    s->oa_bits = in->oa_bits;
    s->g = in->granule;
    s->sl = in->start_level;
    s->flags = in->flags;
    s->stride = s->g - 3u;
    if (s->g != 12 && s->g != 14 && s->g != 16)
        s->g = 12, s->bad = 1;           /* Python validates; keep the C safe anyway */
    if (s->sl > 3 || s->ia_bits < 1 || s->ia_bits > 48 || s->oa_bits < 1 || s->oa_bits > 48) {
        s->sl = 3;
        s->bad = 1;
        return;
    }
    sh = lvl_shift(s->g, s->sl);
    if (s->ia_bits < sh) {
        s->bad = 1;
        return;
    }
    root_bits = s->ia_bits - sh;
    max_root = s->stride + (is_stage2 ? 4u : 0u);
    if (root_bits > max_root) {
        s->bad = 1;
        return;
    }
    /* Stage 2 follows Arm's S2InvalidSL / S2InconsistentSL: the root has at least two entries (one
       entry means a later start level fits), T0SZ is at most 39, 4 KiB never starts at level 3 and
       16/64 KiB never at level 0 (both need FEAT_TTST / 52-bit support, which the walker lacks). */
    if (is_stage2 && (root_bits < 1 || s->ia_bits < 25 || (s->g == 12 && s->sl == 3) || (s->g != 12 && s->sl == 0))) {
        s->bad = 1;
        return;
    }
    if (in->ttbr >> s->oa_bits)
        s->ttbr_bad = 1;
    s->root = in->ttbr & ~((8ull << root_bits) - 1ull);
    s->ns_check = !(s->flags & WK_F_S2) && (s->flags & WK_F_NS_CHECK);
    s->aptable = !(s->flags & WK_F_S2) && (s->flags & WK_F_APTABLE);
    s->next_mask = ADDR_47 & ~((1ull << s->g) - 1ull);
    s->next_bad = s->next_mask & ~((1ull << s->oa_bits) - 1ull);
    s->idx_mask = (1ull << s->stride) - 1ull;
}

static inline uint64_t load64(const struct wk_walker *w, uint64_t a)
{
    uint64_t v;
    memcpy(&v, w->mem + a, 8);
    return v;
}

/* Where a walk is: the table being read, its level, the level's input shift and index, APTable. */
struct wpos {
    uint64_t table, idx;
    uint32_t lvl, sh, wp;
};

#define STEP_TABLE 0u            /* step(): a table descriptor, the walk goes on */
#define STEP_LEAF 0xFFFFFFFFu    /* step(): a valid leaf, r->out/perm/shift filled */

static inline __attribute__((always_inline)) uint32_t walk_start(const struct stg *s, uint32_t stage, uint64_t ia,
                                                                 struct wpos *p)
{
    if (s->bad || (ia >> s->ia_bits))
        return FW(K_TRANSLATION, stage, 0);
    if (s->ttbr_bad)
        return FW(K_ADDRESS_SIZE, stage, 0);
    p->lvl = s->sl;
    p->sh = lvl_shift(s->g, p->lvl);
    p->table = s->root;
    p->idx = ia >> p->sh;                 /* the root index takes every remaining IA bit */
    p->wp = 1;
    return 0;
}

/*
 * The checks of one fetched descriptor `d` (docs/facts/pgtable.md section 3, in order): a table
 * moves `p` one level down (STEP_TABLE); a leaf fills r (STEP_LEAF); anything else is a fault word.
 */
static inline __attribute__((always_inline)) uint32_t step(const struct stg *s, uint32_t stage, uint64_t ia,
                                                           uint32_t acc, uint64_t d, struct wpos *p, struct wres *r)
{
    const uint32_t lvl = p->lvl, sh = p->sh;

    if (!(d & 1u))
        return FW(K_TRANSLATION, stage, lvl);
    if (lvl < 3 && (d & 2u)) {
        /* table descriptor: one mask finds an output address beyond oa_bits (precomputed) */
        if (d & s->next_bad)
            return FW(K_ADDRESS_SIZE, stage, lvl);
        if (s->ns_check && !(d >> 63))
            return FW(K_NS, stage, lvl);
        if (s->aptable && ((d >> 62) & 1u))
            p->wp = 0;
        p->table = d & s->next_mask;
        p->lvl = lvl + 1;
        p->sh = sh - s->stride;
        p->idx = (ia >> p->sh) & s->idx_mask;
        return STEP_TABLE;
    }
    /* leaf: page (L3, 0b11) or block (L<3, 0b01) */
    if (lvl == 3 ? !(d & 2u) : !block_allowed(s->g, lvl))
        return FW(K_TRANSLATION, stage, lvl);
    {
        uint64_t oa = d & ADDR_47 & ~((1ull << sh) - 1ull);
        uint32_t perm;
        if (oa >> s->oa_bits)
            return FW(K_ADDRESS_SIZE, stage, lvl);
        if (s->ns_check && !((d >> 5) & 1u))
            return FW(K_NS, stage, lvl);
        if ((s->flags & WK_F_CHECK_AF) && !((d >> 10) & 1u))
            return FW(K_ACCESS_FLAG, stage, lvl);
        if (s->flags & WK_F_S2)
            perm = (uint32_t)(d >> 6) & 3u;                     /* S2AP: bit6 read, bit7 write */
        else
            perm = ACC_R | ((!((d >> 7) & 1u) && p->wp) ? ACC_W : 0u);   /* AP[2]=0: writable */
        if ((perm & acc) != acc)
            return FW(K_PERMISSION, stage, lvl);
        r->out = oa | (ia & ((1ull << sh) - 1ull));
        r->perm = perm;
        r->shift = sh;
        return STEP_LEAF;
    }
}

/*
 * Walk one stage whose descriptors are machine addresses (stage 2, or a stage 1 without stage
 * 2). Returns 0 or a fault word; on a fault the address to report is `ia`. Inlined into the
 * nested walk, where it runs once per stage-1 level: the hot loop of a nested miss.
 */
static inline __attribute__((always_inline)) uint32_t walk_flat(const struct wk_walker *w, const struct stg *s,
                                                                uint32_t stage, uint64_t ia, uint32_t acc,
                                                                struct wres *r)
{
    struct wpos p;
    uint32_t f = walk_start(s, stage, ia, &p);

    if (f)
        return f;
    for (;;) {
        const uint64_t a = p.table + (p.idx << 3);
        if (a > w->last)
            return FW(K_WALK_ABORT, stage, p.lvl);
        f = step(s, stage, ia, acc, load64(w, a), &p, r);
        if (f != STEP_TABLE)
            return f == STEP_LEAF ? 0 : f;
    }
}

/*
 * What one translation learnt from its last stage-2 walk of a table address: the leaf (2 MiB
 * blocks put the CD table and every stage-1 table in one) and the last-level table (4 KiB pages:
 * tables in the same 2 MiB share it). A later table read of the same translation reuses them
 * instead of re-reading the same upper descriptors. It lives for one translation only --
 * nothing is kept across translations -- and holds only what successful walks read, so results
 * and faults are exactly those of full walks.
 */
struct s2memo {
    uint64_t base, mask, mpa;        /* leaf: IPA base, size - 1 (0: empty), MPA base */
    uint64_t tbase, tmask, table;    /* last table: the IPA region it covers, size - 1 (0: empty), its MPA */
    uint32_t tlvl;
};
#define S2MEMO_EMPTY {0, 0, 0, 0, 0, 0, 0}

/* The MPA of a table read at `ipa` through stage 2 (0 or a stage-2 fault word). */
static inline __attribute__((always_inline)) uint32_t s2_table_read(const struct wk_walker *w, const struct stg *s2,
                                                                    uint64_t ipa, struct s2memo *m, uint64_t *mpa)
{
    struct wpos p;
    struct wres r2;
    uint64_t tbase = 0, tmask = 0, table = 0;
    uint32_t f, tlvl = 0;

    if (m->mask && (ipa & ~m->mask) == m->base) {
        *mpa = m->mpa + (ipa & m->mask);
        return 0;
    }
    if (m->tmask && (ipa & ~m->tmask) == m->tbase) {
        p.lvl = m->tlvl;
        p.sh = lvl_shift(s2->g, p.lvl);
        p.table = m->table;
        p.idx = (ipa >> p.sh) & s2->idx_mask;
        p.wp = 1;
    } else {
        f = walk_start(s2, 2, ipa, &p);
        if (f)
            return f;
    }
    for (;;) {
        const uint64_t a = p.table + (p.idx << 3);
        if (a > w->last)
            return FW(K_WALK_ABORT, 2, p.lvl);
        f = step(s2, 2, ipa, ACC_R, load64(w, a), &p, &r2);
        if (f == STEP_TABLE) {
            tlvl = p.lvl;
            table = p.table;
            tmask = (1ull << (p.sh + s2->stride)) - 1ull;
            tbase = ipa & ~tmask;
            continue;
        }
        if (f != STEP_LEAF)
            return f;
        break;
    }
    if (tmask) {
        m->tlvl = tlvl;
        m->table = table;
        m->tmask = tmask;
        m->tbase = tbase;
    }
    m->mask = (1ull << r2.shift) - 1ull;
    m->base = ipa & ~m->mask;
    m->mpa = r2.out - (ipa & m->mask);
    *mpa = r2.out;
    return 0;
}

/*
 * The stage 1 of a nested context: each descriptor address is an IPA, translated (for a read)
 * by a full stage-2 walk first. Returns 0 or a fault word with r->faddr the address to report;
 * r->tlo/thi get the lowest/highest descriptor IPA fetched.
 */
static uint32_t walk_nested(const struct wk_walker *w, const struct stg *s, const struct stg *s2, uint64_t ia,
                            uint32_t acc, struct wres *r, struct s2memo *m)
{
    struct wpos p;
    uint32_t f = walk_start(s, 1, ia, &p);

    r->faddr = ia;
    r->tlo = ~0ull;
    r->thi = 0;
    if (f)
        return f;
    for (;;) {
        uint64_t a = p.table + (p.idx << 3);
        if (a < r->tlo)
            r->tlo = a;
        if (a > r->thi)
            r->thi = a;
        f = s2_table_read(w, s2, a, m, &a);
        if (f) {
            r->faddr = p.table + (p.idx << 3);
            return f | FW_S1PTW;
        }
        if (a > w->last)
            return FW(K_WALK_ABORT, 1, p.lvl);
        f = step(s, 1, ia, acc, load64(w, a), &p, r);
        if (f != STEP_TABLE)
            return f == STEP_LEAF ? 0 : f;
    }
}

/* Any stage: nested when `s2` is given (stage 1 of a nested context). Sets r->faddr. */
static uint32_t walk_stage(const struct wk_walker *w, const struct stg *s, uint32_t stage, uint64_t ia,
                           uint32_t acc, const struct stg *s2, struct wres *r)
{
    if (s2) {
        struct s2memo m = S2MEMO_EMPTY;
        return walk_nested(w, s, s2, ia, acc, r, &m);
    }
    r->faddr = ia;
    r->tlo = ~0ull;
    r->thi = 0;
    return walk_flat(w, s, stage, ia, acc, r);
}

/* Full translation of one address through a context; fills *e (minus tags) on success. */
static uint32_t translate_one(const struct wk_walker *w, const struct ctx *c, uint64_t addr, uint32_t acc,
                              uint64_t *out, struct tlbe *e, uint64_t *tlo, uint64_t *thi)
{
    struct wres r1, r2;
    uint64_t ipa = addr;
    uint32_t f, perm = ACC_R | ACC_W;

    if (!c->defined) {
        *out = addr;
        return FW(K_TRANSLATION, 1, 0);
    }
    r1.shift = 0;
    if (c->has_s1) {
        f = walk_stage(w, &c->s1, 1, addr, acc, c->has_s2 ? &c->s2 : NULL, &r1);
        if (f) {
            *out = r1.faddr;
            return f;
        }
        ipa = r1.out;
        perm &= r1.perm;
        *tlo = r1.tlo;
        *thi = r1.thi;
    }
    if (c->has_s2) {
        f = walk_stage(w, &c->s2, 2, ipa, acc, NULL, &r2);
        if (f) {
            *out = r2.faddr;
            return f;
        }
        *out = r2.out;
        perm &= r2.perm;
        e->ipa = PAGE_BITS(ipa) | r2.shift;
        e->out = PAGE_BITS(r2.out) | perm | ((uint64_t)(c->has_s1 ? r1.shift : r2.shift) << 2);
    } else {
        *out = ipa;
        e->ipa = 0;
        e->out = PAGE_BITS(ipa) | perm | ((uint64_t)r1.shift << 2);
    }
    return 0;
}

struct tstate;
static void table_free(struct ctx *c);
static void table_flush_all(struct tstate *t);

static void wipe_tlb(struct wk_walker *w)
{
    uint64_t i;
    for (i = 0; i <= w->mask; i++)
        w->tlb[i].tag = 0;
}

static void bump_gen(struct wk_walker *w, struct ctx *c)
{
    c->max_shift = 12;
    c->tbl_lo = ~0ull;
    c->tbl_hi = 0;
    if (++c->gen == 0) {
        /* wrapped: old entries could match again, drop everything (over-invalidation is fine) */
        wipe_tlb(w);
        c->gen = 1;
    }
}

/* ---------------------------------------------------------------------------------------- */
/* exported API                                                                             */

struct wk_walker *wk_new(uintptr_t mem, uint64_t size, uint64_t tlb_entries)
{
    struct wk_walker *w;
    uint64_t n = 1, i;

    if (!mem || size < 8)
        return NULL;
    while (n < tlb_entries && n < (1ull << 24))
        n <<= 1;
    w = calloc(1, sizeof(*w));
    if (!w)
        return NULL;
    w->tlb = calloc(n, sizeof(struct tlbe));
    if (!w->tlb) {
        free(w);
        return NULL;
    }
    w->mem = (const uint8_t *)mem;
    w->size = size;
    w->last = size - 8u;
    w->mask = n - 1;
    w->tlb_on = 1;
    for (i = 0; i < WK_MAX_CTX; i++) {
        w->ctx[i].gen = 1;
        w->ctx[i].tbl_lo = ~0ull;
        w->ctx[i].max_shift = 12;
        w->ctx[i].salt = (i * 0x9E3779B97F4A7C15ull) >> 40;
    }
    return w;
}

void wk_free(struct wk_walker *w)
{
    uint32_t i;
    if (w) {
        for (i = 0; i < WK_MAX_CTX; i++)
            table_free(&w->ctx[i]);
        free(w->tlb);
        free(w);
    }
}

int wk_set_context(struct wk_walker *w, uint32_t ctx_id, const struct wk_stage *s1, const struct wk_stage *s2,
                   uint32_t s2_id)
{
    struct ctx *c;
    if (ctx_id >= WK_MAX_CTX)
        return -1;
    c = &w->ctx[ctx_id];
    table_free(c);
    c->has_s1 = s1 != NULL;
    c->has_s2 = s2 != NULL;
    c->defined = c->has_s1 || c->has_s2;
    c->s2_id = s2_id;
    if (s1)
        stage_setup(&c->s1, s1, 0);
    if (s2)
        stage_setup(&c->s2, s2, 1);
    bump_gen(w, c);
    return 0;
}

/* The miss path: full walk, then (TLB on, success) fill the slot. Kept out of the hit loop. */
static __attribute__((noinline)) void miss(struct wk_walker *w, uint32_t ctx_id, const struct ctx *c, int tlb_on,
                                           uint64_t a, uint32_t acc, struct tlbe *slot, uint64_t *out,
                                           uint32_t *fault)
{
    struct tlbe ne;
    uint64_t tlo = ~0ull, thi = 0;
    uint32_t f = translate_one(w, c, a, acc, out, &ne, &tlo, &thi);

    *fault = f;
    if (f || !tlb_on)
        return;
    {
        struct ctx *wc = &w->ctx[ctx_id];
        ne.page = a >> 12;
        ne.tag = TAG(wc->gen, ctx_id);
        *slot = ne;
        if (E_INSHIFT(&ne) > wc->max_shift)
            wc->max_shift = (uint8_t)E_INSHIFT(&ne);
        if (tlo <= thi) {
            if (tlo < wc->tbl_lo)
                wc->tbl_lo = tlo;
            if (thi > wc->tbl_hi)
                wc->tbl_hi = thi;
        }
    }
}

void wk_translate(struct wk_walker *w, uint32_t ctx_id, const uint64_t *addrs, const uint8_t *accs, uint32_t acc_all,
                  uint64_t n, uint64_t *out, uint32_t *fault)
{
    static const struct ctx undefined_ctx;   /* zeroed: defined = 0 */
    const struct ctx *c = ctx_id < WK_MAX_CTX ? &w->ctx[ctx_id] : &undefined_ctx;
    const int tlb_on = w->tlb_on && c->defined;
    const uint64_t tag = TAG(c->gen, ctx_id);
    const uint64_t salt = c->salt, mask = w->mask;
    struct tlbe *tlb = w->tlb;
    uint64_t i, hits = 0;

    if (!tlb_on) {
        for (i = 0; i < n; i++)
            miss(w, ctx_id, c, 0, addrs[i], (accs ? accs[i] : acc_all) & 3u, NULL, &out[i], &fault[i]);
        w->walks += n;
        return;
    }
    for (i = 0; i < n; i++) {
        const uint64_t a = addrs[i];
        const uint32_t acc = (accs ? accs[i] : acc_all) & 3u;
        const uint64_t page = a >> 12;
        struct tlbe *e = &tlb[(page + salt) & mask];

        if (__builtin_expect(e->page == page && e->tag == tag && (E_PERM(e) & acc) == acc, 1)) {
            out[i] = PAGE_BITS(e->out) | (a & 0xFFFull);
            fault[i] = 0;
            hits++;
            continue;
        }
        miss(w, ctx_id, c, 1, a, acc, e, &out[i], &fault[i]);
    }
    w->hits += hits;
    w->misses += n - hits;
    w->walks += n - hits;
}

/*
 * A DMA transfer's worth of translation in one call: every page (of 2^gran bytes) that
 * [addr, addr + len) touches, ascending, coalesced into machine-contiguous (mpa, n) runs.
 * Returns the number of runs, -1 with *fault / *faddr set for the first page that fails, or -2
 * when more than max_runs runs are needed (the caller retries with room for one run a page).
 * The range is clipped at 2^64 - 1; such addresses fault long before (input sizes <= 48 bits).
 */
/* Add (machine address, length) to a transfer's runs, merged into the last run when it continues
 * it; -1 when a new run would exceed max_runs. */
static inline int append_run(uint64_t *runs, uint64_t *nr, uint64_t max_runs, uint64_t o, uint64_t n)
{
    uint64_t k = *nr;

    if (k && runs[2 * k - 2] + runs[2 * k - 1] == o) {
        runs[2 * k - 1] += n;
        return 0;
    }
    if (k == max_runs)
        return -1;
    runs[2 * k] = o;
    runs[2 * k + 1] = n;
    *nr = k + 1;
    return 0;
}

int64_t wk_translate_range(struct wk_walker *w, uint32_t ctx_id, uint64_t addr, uint64_t len, uint32_t acc,
                           uint32_t gran, uint64_t *runs, uint64_t max_runs, uint32_t *fault, uint64_t *faddr)
{
    const uint64_t size = 1ull << (gran >= 12 && gran <= 16 ? gran : 12);
    const uint64_t last = len > ~0ull - addr ? ~0ull : addr + len - 1u;   /* inclusive */
    uint64_t cur = addr, nr = 0;

    if (!len)
        return 0;
    for (;;) {
        uint64_t o, page_last = (cur | (size - 1u)) < last ? (cur | (size - 1u)) : last;
        uint32_t f;
        wk_translate(w, ctx_id, &cur, NULL, acc, 1, &o, &f);
        if (f) {
            *fault = f;
            *faddr = o;
            return -1;
        }
        if (append_run(runs, &nr, max_runs, o, page_last - cur + 1u) < 0)
            return -2;
        if (page_last == last)
            return (int64_t)nr;
        cur = page_last + 1u;
    }
}

void wk_invalidate_all(struct wk_walker *w)
{
    uint32_t i;
    for (i = 0; i < WK_MAX_CTX; i++) {
        bump_gen(w, &w->ctx[i]);
        if (w->ctx[i].tbl)
            table_flush_all(w->ctx[i].tbl);
    }
}

void wk_invalidate_context(struct wk_walker *w, uint32_t ctx_id)
{
    if (ctx_id < WK_MAX_CTX) {
        bump_gen(w, &w->ctx[ctx_id]);
        if (w->ctx[ctx_id].tbl)
            table_flush_all(w->ctx[ctx_id].tbl);
    }
}

static inline int overlaps(uint64_t base, uint32_t shift, uint64_t start, uint64_t end)
{
    uint64_t lo = base & ~((1ull << shift) - 1ull);
    uint64_t hi = lo + (1ull << shift) - 1ull;   /* inclusive: no overflow for < 2^64 regions */
    return lo <= end && hi >= start;
}

/* end is inclusive (start + length - 1, saturated) so a range reaching 2^64 still works. */
void wk_invalidate_range(struct wk_walker *w, uint32_t ctx_id, uint64_t start, uint64_t end)
{
    struct ctx *c;
    uint64_t i;

    if (ctx_id >= WK_MAX_CTX || end < start)
        return;
    c = &w->ctx[ctx_id];
    if (c->max_shift <= 12 && ((end >> 12) - (start >> 12)) < 64) {
        /* only 4K leaves cached: probe the pages */
        uint64_t p;
        for (p = start >> 12; p <= (end >> 12); p++) {
            struct tlbe *e = &w->tlb[(p + c->salt) & w->mask];
            if (e->page == p && TAG_CTX(e->tag) == ctx_id)
                e->tag = 0;
        }
        return;
    }
    for (i = 0; i <= w->mask; i++) {
        struct tlbe *e = &w->tlb[i];
        if (e->tag == TAG(c->gen, ctx_id) && overlaps(e->page << 12, E_INSHIFT(e), start, end))
            e->tag = 0;
    }
}

void wk_invalidate_ipa(struct wk_walker *w, uint32_t s2_id, uint64_t start, uint64_t end)
{
    uint64_t i;
    uint32_t k;
    if (end < start)
        return;
    for (k = 0; k < WK_MAX_CTX; k++) {
        struct ctx *c = &w->ctx[k];
        if (c->has_s1 && c->has_s2 && c->s2_id == s2_id && c->tbl_lo <= end && c->tbl_hi >= start)
            bump_gen(w, c);
        /* a table context: its CDs and translations all went through this stage 2 */
        if (c->tbl && c->s2_id == s2_id)
            table_flush_all(c->tbl);
    }
    for (i = 0; i <= w->mask; i++) {
        struct tlbe *e = &w->tlb[i];
        const struct ctx *c;
        if (!TAG_GEN(e->tag) || !E_IPASHIFT(e) || TAG_CTX(e->tag) >= WK_MAX_CTX)
            continue;
        c = &w->ctx[TAG_CTX(e->tag)];
        if (TAG_GEN(e->tag) == c->gen && c->has_s2 && c->s2_id == s2_id &&
            overlaps(PAGE_BITS(e->ipa), E_IPASHIFT(e), start, end))
            e->tag = 0;
    }
}

void wk_stats(const struct wk_walker *w, uint64_t *out3)
{
    out3[0] = w->hits;
    out3[1] = w->misses;
    out3[2] = w->walks;
}

void wk_reset_stats(struct wk_walker *w)
{
    w->hits = w->misses = w->walks = 0;
}

void wk_set_tlb(struct wk_walker *w, int on)
{
    w->tlb_on = on != 0;
}

int wk_get_tlb(const struct wk_walker *w)
{
    return w->tlb_on;
}

/*
 * Bench-only floor: `reps` x `loads` dependent 64-bit loads along a chain in machine memory
 * (each node holds the address of the next; the bench makes it a cycle of `loads` nodes).
 * Returns the last address so the loop cannot be optimised out.
 */
uint64_t wk_bench_chase(const struct wk_walker *w, uint64_t start, uint64_t loads, uint64_t reps)
{
    uint64_t r, k, p = start;
    for (r = 0; r < reps; r++) {
        for (k = 0; k < loads; k++) {
            if (p > w->size - 8u)
                return p;
            p = load64(w, p);
        }
    }
    return p;
}

/* ---------------------------------------------------------------------------------------- */
/* PASID tables: SMMUv3 context-descriptor tables, nested over a stage 2 (DESIGN section 6)  */
/*
 * A table context holds what ATTACH_TABLE gave (S1ContextPtr, S1Fmt, S1CDMax: all IPAs) and the
 * id of the context whose stage 2 (the domain's P2M) translates every guest-physical access:
 * the L1 CD descriptor, the CD, each stage-1 table and the output. It caches like hardware:
 *
 *  - decoded CDs per PASID (at most CD_MAX; invalid CDs, L1 misses and faults never cached);
 *  - translations per (ASID, 4 KiB input page), fractured like the main IOTLB but held in an
 *    open-addressing table (linear probing, backward-shift deletion) so nothing leaves it until
 *    an invalidation covers it or PT_MAX entries are exceeded (then it is flushed whole).
 *
 * Both are only ever dropped by the wk_table_inv_* calls, a P2M change of their stage 2
 * (wk_invalidate_ipa), wk_invalidate_all/_context or a redefinition.
 */
#define PT_SLOTS (1u << 17)
#define PT_MAX (1u << 16)
#define CD_SLOTS 2048u
#define CD_MAX 1024u

struct wk_cdtable {
    uint64_t ptr;        /* S1ContextPtr (IPA) */
    uint32_t fmt;        /* 0 linear, 1 two-level 4 KiB leaves, 2 two-level 64 KiB leaves */
    uint32_t cdmax;      /* log2 of the number of CDs, 0..20 */
    uint32_t s2_ctx;     /* the context whose stage 2 translates table accesses */
};

/* One decoded CD. */
struct cd {
    struct stg s1;
    uint32_t asid;
    uint32_t epd0;
};

struct cdce {
    uint32_t key;        /* PASID + 1; meaningful only when gen is current */
    uint32_t gen;
    struct cd cd;
};

struct ptlbe {
    uint64_t page;       /* input address >> 12 */
    uint32_t gen;        /* == tstate.tgen: live */
    uint16_t asid;
    uint8_t perm;
    uint8_t inshift;     /* input leaf shift (stage 1) */
    uint64_t out;        /* output MPA of that 4K page */
    uint64_t ipa;        /* IPA of that 4K page | stage-2 leaf shift (bits 5:0) */
};

struct tstate {
    uint64_t ptr;
    uint32_t fmt, cdmax, s2_ctx;
    uint32_t tgen, cgen;
    uint32_t tcount, ccount;
    uint32_t max_inshift;
    struct ptlbe *tlb;   /* PT_SLOTS */
    struct cdce *cdc;    /* CD_SLOTS */
};

static inline uint64_t pt_home(uint32_t asid, uint64_t page)
{
    return ((page * 0x9E3779B97F4A7C15ull) ^ ((uint64_t)asid * 0xC2B2AE3D27D4EB4Full)) >> 47;   /* 17 bits */
}

static inline uint64_t cd_home(uint32_t key)
{
    return ((uint64_t)key * 0x9E3779B97F4A7C15ull) >> 53;    /* 11 bits */
}

static void table_flush_tlb(struct tstate *t)
{
    t->tcount = 0;
    t->max_inshift = 12;
    if (++t->tgen == 0) {
        memset(t->tlb, 0, sizeof(struct ptlbe) * (size_t)PT_SLOTS);
        t->tgen = 1;
    }
}

static void table_flush_cds(struct tstate *t)
{
    t->ccount = 0;
    if (++t->cgen == 0) {
        memset(t->cdc, 0, sizeof(struct cdce) * (size_t)CD_SLOTS);
        t->cgen = 1;
    }
}

static void table_flush_all(struct tstate *t)
{
    table_flush_tlb(t);
    table_flush_cds(t);
}

static void table_free(struct ctx *c)
{
    if (c->tbl) {
        free(c->tbl->tlb);
        free(c->tbl->cdc);
        free(c->tbl);
        c->tbl = NULL;
    }
}

/* -- the CD cache ---------------------------------------------------------------------- */
static struct cd *cdc_find(struct tstate *t, uint32_t pasid)
{
    const uint32_t key = pasid + 1u;
    uint64_t i = cd_home(key);
    for (;;) {
        struct cdce *e = &t->cdc[i];
        if (e->gen != t->cgen)
            return NULL;
        if (e->key == key)
            return &e->cd;
        i = (i + 1u) & (CD_SLOTS - 1u);
    }
}

static struct cd *cdc_insert(struct tstate *t, uint32_t pasid, const struct cd *cd)
{
    const uint32_t key = pasid + 1u;
    uint64_t i;
    if (t->ccount >= CD_MAX)
        table_flush_cds(t);      /* beyond the contract's 1024 the device may evict: all of them */
    i = cd_home(key);
    for (;;) {
        struct cdce *e = &t->cdc[i];
        if (e->gen != t->cgen || e->key == key) {
            if (e->gen != t->cgen)
                t->ccount++;
            e->gen = t->cgen;
            e->key = key;
            e->cd = *cd;
            return &e->cd;
        }
        i = (i + 1u) & (CD_SLOTS - 1u);
    }
}

static void cdc_delete(struct tstate *t, uint32_t pasid)
{
    const uint64_t mask = CD_SLOTS - 1u;
    const uint32_t key = pasid + 1u;
    uint64_t i = cd_home(key), j;
    for (;;) {
        struct cdce *e = &t->cdc[i];
        if (e->gen != t->cgen)
            return;
        if (e->key == key)
            break;
        i = (i + 1u) & mask;
    }
    /* backward-shift deletion keeps every probe chain intact */
    j = i;
    for (;;) {
        struct cdce *e;
        uint64_t h;
        j = (j + 1u) & mask;
        e = &t->cdc[j];
        if (e->gen != t->cgen)
            break;
        h = cd_home(e->key);
        if (j > i ? (h <= i || h > j) : (h <= i && h > j)) {
            t->cdc[i] = *e;
            i = j;
        }
    }
    t->cdc[i].gen = 0;
    t->ccount--;
}

/* -- the translation cache --------------------------------------------------------------- */
static inline struct ptlbe *pt_find(struct tstate *t, uint32_t asid, uint64_t page)
{
    uint64_t i = pt_home(asid, page);
    for (;;) {
        struct ptlbe *e = &t->tlb[i];
        if (e->gen != t->tgen)
            return NULL;
        if (e->page == page && e->asid == asid)
            return e;
        i = (i + 1u) & (PT_SLOTS - 1u);
    }
}

static void pt_insert(struct tstate *t, const struct ptlbe *ne)
{
    uint64_t i;
    if (t->tcount >= PT_MAX)
        table_flush_tlb(t);      /* beyond the contract's 65536 the device may evict: all of them */
    i = pt_home(ne->asid, ne->page);
    for (;;) {
        struct ptlbe *e = &t->tlb[i];
        if (e->gen != t->tgen || (e->page == ne->page && e->asid == ne->asid)) {
            if (e->gen != t->tgen)
                t->tcount++;
            *e = *ne;
            e->gen = t->tgen;
            if (ne->inshift > t->max_inshift)
                t->max_inshift = ne->inshift;
            return;
        }
        i = (i + 1u) & (PT_SLOTS - 1u);
    }
}

static void pt_delete_at(struct tstate *t, uint64_t i)
{
    const uint64_t mask = PT_SLOTS - 1u;
    uint64_t j = i;
    for (;;) {
        struct ptlbe *e;
        uint64_t h;
        j = (j + 1u) & mask;
        e = &t->tlb[j];
        if (e->gen != t->tgen)
            break;
        h = pt_home(e->asid, e->page);
        if (j > i ? (h <= i || h > j) : (h <= i && h > j)) {
            t->tlb[i] = *e;
            i = j;
        }
    }
    t->tlb[i].gen = 0;
    t->tcount--;
}

/*
 * Drop the translations of `asid` (every ASID when asid < 0) whose input leaf overlaps
 * [start, end] (inclusive). Few pages and only 4 KiB leaves cached: probe them; otherwise one
 * pass keeps the survivors and re-inserts them under a new generation.
 */
static void pt_invalidate(struct tstate *t, int64_t asid, uint64_t start, uint64_t end)
{
    uint64_t i, n = 0;
    struct ptlbe *keep;

    if (end < start || !t->tcount)
        return;
    if (asid >= 0 && t->max_inshift <= 12 && ((end >> 12) - (start >> 12)) < 64) {
        uint64_t p;
        for (p = start >> 12; p <= (end >> 12); p++) {
            struct ptlbe *e = pt_find(t, (uint32_t)asid, p);
            if (e)
                pt_delete_at(t, (uint64_t)(e - t->tlb));
        }
        return;
    }
    keep = malloc(sizeof(struct ptlbe) * (size_t)t->tcount);
    if (!keep) {
        table_flush_tlb(t);      /* over-invalidation is always allowed */
        return;
    }
    for (i = 0; i < PT_SLOTS; i++) {
        const struct ptlbe *e = &t->tlb[i];
        if (e->gen != t->tgen)
            continue;
        if ((asid < 0 || e->asid == (uint32_t)asid) && overlaps(e->page << 12, e->inshift, start, end))
            continue;
        keep[n++] = *e;
    }
    table_flush_tlb(t);
    for (i = 0; i < n; i++)
        pt_insert(t, &keep[i]);
    free(keep);
}

/* -- CD fetch and decode ------------------------------------------------------------------- */
static const uint32_t ips_bits[8] = {32, 36, 40, 42, 44, 48, 52, 52};

/*
 * The CD's fields -> a stage-1 configuration; 0 when the CD is not valid (C_BAD_CD). Every valid
 * CD is a consistent VMSAv8-64 stage 1 (T0SZ 16..39 with the start level Arm's tables give), so
 * the fields are set directly rather than through stage_setup's general checks: this runs once
 * per cold translation.
 */
static int cd_decode(uint64_t d0, uint64_t d1, struct cd *out)
{
    const uint32_t t0sz = (uint32_t)(d0 & 63u), tg0 = (uint32_t)(d0 >> 6) & 3u;
    struct stg *s = &out->s1;
    uint32_t g, ia, sl, oa, root_bits;

    if (!((d0 >> 31) & 1u) || t0sz < 16 || t0sz > 39 || tg0 == 3 || ((d0 >> 15) & 1u) || !((d0 >> 41) & 1u))
        return 0;
    ia = 64u - t0sz;
    /* start level = 4 - (ia - 4) / (g - 3), divisions by constants */
    if (tg0 == 0)
        g = 12, sl = 4u - (ia - 4u) / 9u;
    else if (tg0 == 1)
        g = 16, sl = 4u - (ia - 4u) / 13u;
    else
        g = 14, sl = 4u - (ia - 4u) / 11u;
    oa = ips_bits[(d0 >> 32) & 7u];
    if (oa > 40u)
        oa = 40u;
    root_bits = ia - lvl_shift(g, sl);
    s->ia_bits = ia;
    s->oa_bits = oa;
    s->g = g;
    s->sl = sl;
    s->flags = (((d0 >> 35) & 1u) ? 0u : WK_F_CHECK_AF) | (((d1 >> 1) & 1u) ? 0u : WK_F_APTABLE);
    s->stride = g - 3u;
    s->bad = 0;
    s->ns_check = 0;
    s->aptable = !((d1 >> 1) & 1u);
    s->next_mask = ADDR_47 & ~((1ull << g) - 1ull);
    s->next_bad = s->next_mask & ~((1ull << oa) - 1ull);
    s->idx_mask = (1ull << s->stride) - 1ull;
    d1 &= 0x000FFFFFFFFFFFF0ull;                          /* TTB0: address bits [51:4] */
    s->ttbr_bad = (d1 >> oa) != 0;
    s->root = d1 & ~((8ull << root_bits) - 1ull);
    out->asid = (uint32_t)(d0 >> 48);
    out->epd0 = (uint32_t)(d0 >> 14) & 1u;
    return 1;
}

/*
 * Read and decode the CD of `pasid`, every access through stage 2. Returns 0 or a fault word
 * (with FW_FETCH saying which fetch); *faddr gets the IPA of the failing L1 descriptor or CD
 * (the PASID itself when it is out of range).
 */
static uint32_t cd_fetch(const struct wk_walker *w, const struct tstate *t, const struct stg *s2, uint32_t pasid,
                         struct cd *out, uint64_t *faddr, struct s2memo *memo)
{
    uint64_t cd_ipa, m;
    uint32_t f;

    if (t->cdmax < 32u && (pasid >> t->cdmax)) {
        *faddr = pasid;
        return FW(K_BAD_SUBSTREAM, 1, 0);
    }
    if (t->fmt == 0) {
        cd_ipa = t->ptr + 64ull * pasid;
    } else {
        const uint32_t split = t->fmt == 1 ? 6u : 10u;
        const uint64_t l1_ipa = t->ptr + 8ull * (pasid >> split);
        uint64_t l1, l2, a;
        f = s2_table_read(w, s2, l1_ipa, memo, &a);
        *faddr = l1_ipa;
        if (f)
            return f | FW_FETCH(FETCH_L1);
        if (a > w->last)
            return FW(K_WALK_ABORT, 1, 0) | FW_FETCH(FETCH_L1);
        l1 = load64(w, a);
        if (!(l1 & 1u))
            return FW(K_BAD_SUBSTREAM, 1, 0) | FW_FETCH(FETCH_L1);
        l2 = l1 & 0x000FFFFFFFFFF000ull;                      /* L2Ptr: bits [51:12] */
        if (t->fmt == 2)
            l2 &= ~0xFFFFull;                                 /* 64 KiB leaves: L2Ptr[15:12] RES0 */
        cd_ipa = l2 + 64ull * (pasid & ((1u << split) - 1u));
    }
    *faddr = cd_ipa;
    f = s2_table_read(w, s2, cd_ipa, memo, &m);
    if (f)
        return f | FW_FETCH(FETCH_CD);
    if (m > w->size - 16u)
        return FW(K_WALK_ABORT, 1, 0) | FW_FETCH(FETCH_CD);
    if (!cd_decode(load64(w, m), load64(w, m + 8u), out))
        return FW(K_BAD_CD, 1, 0) | FW_FETCH(FETCH_CD);
    return 0;
}

/* Stage 1 (nested) then stage 2 for one address under a decoded CD; fills *e on success. */
static uint32_t cd_translate(const struct wk_walker *w, const struct cd *cd, const struct stg *s2, uint64_t addr,
                             uint32_t acc, uint64_t *out, struct ptlbe *e, struct s2memo *memo)
{
    struct wres r1, r2 = {0, 0, 0, 0, 0, 0};
    uint32_t f;

    if (cd->epd0) {
        *out = addr;
        return FW(K_TRANSLATION, 1, 0);
    }
    f = walk_nested(w, &cd->s1, s2, addr, acc, &r1, memo);
    if (f) {
        *out = r1.faddr;
        return f;
    }
    f = walk_flat(w, s2, 2, r1.out, acc, &r2);
    if (f) {
        *out = r1.out;
        return f;
    }
    *out = r2.out;
    e->page = addr >> 12;
    e->asid = (uint16_t)cd->asid;
    e->perm = (uint8_t)(r1.perm & r2.perm);
    e->inshift = (uint8_t)r1.shift;
    e->out = PAGE_BITS(r2.out);
    e->ipa = PAGE_BITS(r1.out) | r2.shift;
    return 0;
}

/* The decoded CD of `pasid`: from the cache (TLB on) or fetched now. NULL with *fault set. */
static const struct cd *cd_get(struct wk_walker *w, struct tstate *t, const struct stg *s2, uint32_t pasid,
                               int cache, struct cd *tmp, uint32_t *fault, uint64_t *faddr, struct s2memo *memo)
{
    const struct cd *cd = cache ? cdc_find(t, pasid) : NULL;
    if (cd)
        return cd;
    *fault = cd_fetch(w, t, s2, pasid, tmp, faddr, memo);
    if (*fault)
        return NULL;
    return cache ? cdc_insert(t, pasid, tmp) : tmp;
}

int wk_set_table(struct wk_walker *w, uint32_t ctx_id, const struct wk_cdtable *cfg)
{
    struct ctx *c;
    struct tstate *t;

    if (ctx_id >= WK_MAX_CTX || cfg->s2_ctx >= WK_MAX_CTX || cfg->s2_ctx == ctx_id || cfg->fmt > 2 ||
        cfg->cdmax > 20)
        return -1;
    if (!w->ctx[cfg->s2_ctx].has_s2 || w->ctx[cfg->s2_ctx].has_s1 || w->ctx[cfg->s2_ctx].tbl)
        return -1;
    c = &w->ctx[ctx_id];
    t = c->tbl;
    if (!t) {
        t = calloc(1, sizeof(*t));
        if (!t)
            return -2;
        t->tlb = calloc(PT_SLOTS, sizeof(struct ptlbe));
        t->cdc = calloc(CD_SLOTS, sizeof(struct cdce));
        if (!t->tlb || !t->cdc) {
            free(t->tlb);
            free(t->cdc);
            free(t);
            return -2;
        }
        c->tbl = t;
    }
    t->ptr = cfg->ptr;
    t->fmt = cfg->fmt;
    t->cdmax = cfg->cdmax;
    t->s2_ctx = cfg->s2_ctx;
    table_flush_tlb(t);
    table_flush_cds(t);
    c->has_s1 = 0;
    c->has_s2 = 0;
    c->defined = 0;              /* wk_translate on it faults: only the wk_table_* calls translate */
    c->s2_id = w->ctx[cfg->s2_ctx].s2_id;
    bump_gen(w, c);
    return 0;
}

/*
 * A batch of addresses through PASID `pasid` of a table context (the bench's path). TLB off:
 * every translation fetches the CD and walks both stages (a cold translation).
 */
void wk_table_translate(struct wk_walker *w, uint32_t ctx_id, uint32_t pasid, const uint64_t *addrs,
                        const uint8_t *accs, uint32_t acc_all, uint64_t n, uint64_t *out, uint32_t *fault)
{
    struct tstate *t = ctx_id < WK_MAX_CTX ? w->ctx[ctx_id].tbl : NULL;
    const struct stg *s2;
    const struct cd *cd = NULL;
    struct cd tmp;
    struct ptlbe ne;
    uint32_t cdf = 0;
    uint64_t cdaddr = 0, i, hits = 0;
    const int cache = w->tlb_on;

    if (!t) {
        for (i = 0; i < n; i++) {
            out[i] = addrs[i];
            fault[i] = FW(K_TRANSLATION, 1, 0);
        }
        return;
    }
    s2 = &w->ctx[t->s2_ctx].s2;
    if (cache) {
        struct s2memo memo = S2MEMO_EMPTY;
        cd = cd_get(w, t, s2, pasid, 1, &tmp, &cdf, &cdaddr, &memo);
    }
    for (i = 0; i < n; i++) {
        const uint64_t a = addrs[i];
        const uint32_t acc = (accs ? accs[i] : acc_all) & 3u;
        struct s2memo memo = S2MEMO_EMPTY;      /* one translation's stage-2 leaf, never kept longer */
        if (!cache) {
            cd = cd_get(w, t, s2, pasid, 0, &tmp, &cdf, &cdaddr, &memo);
        } else if (cd) {
            const struct ptlbe *e = pt_find(t, cd->asid, a >> 12);
            if (e && (e->perm & acc) == acc) {
                out[i] = e->out | (a & 0xFFFull);
                fault[i] = 0;
                hits++;
                continue;
            }
        }
        if (!cd) {
            out[i] = cdaddr;
            fault[i] = cdf;
            continue;
        }
        fault[i] = cd_translate(w, cd, s2, a, acc, &out[i], &ne, &memo);
        if (!fault[i] && cache)
            pt_insert(t, &ne);
    }
    w->hits += hits;
    w->misses += cache ? n - hits : 0;
    w->walks += n - hits;
}

/*
 * A DMA transfer through PASID `pasid`: like wk_translate_range (4 KiB pages, coalesced runs,
 * -1 at the first failing page, -2 when the runs do not fit), plus *fiova = the first byte of
 * the failing page the transfer touches.
 */
int64_t wk_table_translate_range(struct wk_walker *w, uint32_t ctx_id, uint32_t pasid, uint64_t addr, uint64_t len,
                                 uint32_t acc, uint64_t *runs, uint64_t max_runs, uint32_t *fault, uint64_t *faddr,
                                 uint64_t *fiova)
{
    const uint64_t last = len > ~0ull - addr ? ~0ull : addr + len - 1u;
    uint64_t cur = addr, nr = 0;

    if (!len)
        return 0;
    for (;;) {
        uint64_t o, page_last = (cur | 0xFFFull) < last ? (cur | 0xFFFull) : last;
        uint32_t f;
        wk_table_translate(w, ctx_id, pasid, &cur, NULL, acc, 1, &o, &f);
        if (f) {
            *fault = f;
            *faddr = o;
            *fiova = cur;
            return -1;
        }
        if (append_run(runs, &nr, max_runs, o, page_last - cur + 1u) < 0)
            return -2;
        if (page_last == last)
            return (int64_t)nr;
        cur = page_last + 1u;
    }
}

/* INVALIDATE, type PASID: the cached CD of `pasid`, or every cached CD when pasid < 0. */
void wk_table_inv_cd(struct wk_walker *w, uint32_t ctx_id, int64_t pasid)
{
    struct tstate *t = ctx_id < WK_MAX_CTX ? w->ctx[ctx_id].tbl : NULL;
    if (!t)
        return;
    if (pasid < 0)
        table_flush_cds(t);
    else
        cdc_delete(t, (uint32_t)pasid);
}

/* INVALIDATE, type IOTLB: translations of `asid` (all when < 0) whose leaf overlaps [start, end]. */
void wk_table_inv_tlb(struct wk_walker *w, uint32_t ctx_id, int64_t asid, uint64_t start, uint64_t end)
{
    struct tstate *t = ctx_id < WK_MAX_CTX ? w->ctx[ctx_id].tbl : NULL;
    if (!t)
        return;
    if (asid < 0 && start == 0 && end == ~0ull)
        table_flush_tlb(t);
    else
        pt_invalidate(t, asid, start, end);
}

/* The ASID of the cached CD of `pasid`, or -1 when none is cached. */
int64_t wk_table_cached_asid(struct wk_walker *w, uint32_t ctx_id, uint32_t pasid)
{
    struct tstate *t = ctx_id < WK_MAX_CTX ? w->ctx[ctx_id].tbl : NULL;
    const struct cd *cd = t ? cdc_find(t, pasid) : NULL;
    return cd ? (int64_t)cd->asid : -1;
}

/* Cached CDs and translations of a table context (tests: the caps and what INVALIDATE drops). */
void wk_table_counts(const struct wk_walker *w, uint32_t ctx_id, uint64_t *out2)
{
    const struct tstate *t = ctx_id < WK_MAX_CTX ? w->ctx[ctx_id].tbl : NULL;
    out2[0] = t ? t->ccount : 0;
    out2[1] = t ? t->tcount : 0;
}
