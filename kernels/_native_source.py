"""The C source of the native CPU kernel (``kernels/native.py`` compiles and loads it).

A Python string rather than a ``.c`` file so that it ships wherever the package does (setup.py lists
no data files for ``kernels``). Plain C with GCC/Clang vector extensions, no headers but ``stdint.h``
(and ``immintrin.h`` where the CPU has AVX-512: its mask registers make a select one instruction, not
two) and no library calls: the compiler maps the 16-lane vectors onto whatever the CPU has (AVX-512: one
register; AVX2: two; NEON, SSE: four).

**Layout.** The pixels of one *block* (the output pixels between the same four grid points: a row
segment times a column segment, ``kernels/scores.py``'s ``_AxisCells``) sit in the lanes of up to
``CHUNK`` vectors; the kernel loops over the block's classes, each a broadcast of its four corner
values, so that every reduction over classes (largest value, its first class, the sum of exps) is
lane-wise: no horizontal reductions, no gathers, ``CHUNK`` independent chains.

**Exponents.** The grid is ``fine_grid.relative_logits``: at every grid point the largest class is
exactly 0 and the rest below, so every pixel's exponents are at most 0 (up to rounding) and the
score is ``exp(peak) / sum_c exp(v_c)`` in one pass, without a pass for the maximum first. Where a
vector's peak is below ``UNDERFLOW`` (huge scales or slopes), its pixels are evaluated again with
their own peak subtracted. Exponents are floored at ``FLOOR`` (``exp`` of float32 below -87 is
denormal or 0): a term raised to ``exp(-87)`` adds under ``C * exp(-87 - UNDERFLOW)`` relative to
the winner's.

**Strips** (with scores, where 16 consecutive output columns span at most ``GROUP_CELLS`` cells: upsampling
by about 5 or more on the refined grid): lanes along the columns, one output row per vector, so that down
a cell's rows each class's term is a geometric progression: two exps per class and 16 columns for a chain
of up to ``RESTART`` rows, then a multiply per row (see "Strips" below for its precision and guard).
``pacl_relative_logits`` computes ``fine_grid.relative_logits`` (same bits) in one pass.

**Precision.** ``exp_below_zero``: Cody-Waite reduction and Cephes' degree-6 polynomial, relative
error under 1e-7 (``tests/test_head_kernels.py`` measures it against float64). Sums run in float
over ``PARTIAL`` classes, then in double, so that their rounding does not grow with ``C``.
"""

SOURCE = r"""
#include <stdint.h>

typedef float vf __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));
typedef double vd __attribute__((vector_size(64)));
typedef int64_t vl __attribute__((vector_size(64)));
typedef float vf8 __attribute__((vector_size(32)));
#define L 16            /* lanes of a vector */
#define CHUNK 16        /* vectors of pixels evaluated together: 256 pixels */
#define PARTIAL 8       /* classes summed in float before the sum goes on in double */
#define FLOOR (-87.0f)  /* lowest exponent given to exp: exp(-87) ~ 1.6e-38 */
#define UNDERFLOW (-40.0f)

/* Bump with any change of an exported signature: native.py refuses a library of another version. */
int64_t pacl_native_abi(void) { return 4; }

/* Masks of lanes: AVX-512's mask registers (a compare and one masked move per select), else vector masks. */
#if defined(__AVX512F__)
#include <immintrin.h>
typedef __mmask16 lanes_t;
static inline lanes_t greater(vf a, vf b) { return _mm512_cmp_ps_mask((__m512)a, (__m512)b, _CMP_GT_OQ); }
static inline vf pick_f(lanes_t m, vf a, vf b) { return (vf)_mm512_mask_mov_ps((__m512)b, m, (__m512)a); }
static inline vi pick_i(lanes_t m, vi a, vi b) { return (vi)_mm512_mask_mov_epi32((__m512i)b, m, (__m512i)a); }
#else
typedef vi lanes_t;
static inline lanes_t greater(vf a, vf b) { return a > b; }
static inline vf pick_f(lanes_t m, vf a, vf b) { return (vf)(((vi)a & m) | ((vi)b & ~m)); }
static inline vi pick_i(lanes_t m, vi a, vi b) { return (a & m) | (b & ~m); }
#endif

/* x in every lane: a broadcast. ((vf){0} + x is not one: it must turn -0.0 into +0.0, a scalar add first.) */
static inline vf splat(float x) { return (vf){x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x}; }
static inline vi splat_i(int32_t x) { return (vi){0} + x; }
static inline vf select_f(vi m, vf a, vf b) { return (vf)(((vi)a & m) | ((vi)b & ~m)); }

/* exp(x) for x in [FLOOR, 0]: x = k ln2 + r, |r| <= ln2 / 2 (ln2 in two parts, so k ln2 is exact),
   Cephes' polynomial for exp(r), times 2^k written into the exponent bits. exp(0) is exactly 1. */
static inline vf exp_below_zero(vf x) {
    const float magic = 12582912.0f; /* 1.5 * 2^23: adding it rounds to an integer, kept in the low bits */
    const vf shifted = x * 1.44269504088896341f + magic;
    const vf k = shifted - magic;
    vf r = x - k * 0.693359375f;
    r = r - k * -2.12194440e-4f;
    vf p = r * 1.9875691500e-4f + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * (r * r) + r + 1.0f;
    const vi bits = ((vi)shifted - (0x4B400000 - 127)) << 23; /* (k + 127) << 23 */
    return p * (vf)bits;
}

static inline vf floored_exp(vf x) { return exp_below_zero(select_f(x > FLOOR, x, splat(FLOOR))); }

/* total (two double vectors: lanes 0-7, 8-15) += partial. (Through memory the halves would pin partial sums
   to the stack: AVX-512 converts each half in registers.) */
static inline void carry(vf partial, vd* total) {
#if defined(__AVX512F__)
    const __m512 all = (__m512)partial;
    total[0] += (vd)_mm512_cvtps_pd(_mm512_castps512_ps256(all));
    total[1] += (vd)_mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(all), 1)));
#else
    vf8 low, high;
    __builtin_memcpy(&low, &partial, 32);
    __builtin_memcpy(&high, (char*)&partial + 32, 32);
    total[0] += __builtin_convertvector(low, vd);
    total[1] += __builtin_convertvector(high, vd);
#endif
}

/* Test hook: out[i] = exp(max(x[i], FLOOR)) as the kernel computes it; n a multiple of 16. */
void pacl_native_exp(const float* x, float* out, int64_t n) {
    for (int64_t i = 0; i + L <= n; i += L) {
        vf v;
        __builtin_memcpy(&v, x + i, sizeof v);
        const vf e = floored_exp(v);
        __builtin_memcpy(out + i, &e, sizeof e);
    }
}

typedef struct {
    const float *c00, *c01, *c10, *c11; /* the block's corners: top left, top right, bottom left, bottom right */
    const int32_t* classes;             /* the classes it evaluates (ascending), or 0: all */
    int64_t count;
} Block;

/* One chunk of a block's pixels (n vectors, weights wy / wx per lane): per lane the largest value,
   the first slot reaching it (classes ascend, and a slot replaces the best only when strictly
   higher: the lowest class wins ties, as torch.argmax) and, with scores, the sum of exps. */
static inline __attribute__((always_inline)) void evaluate(const Block* block, int64_t n, const vf* wy,
                                                           const vf* wx, vf* best, vi* first, vf* partial,
                                                           vd* total, const int with_scores) {
    for (int64_t j = 0; j < n; j++) {
        best[j] = splat(-__builtin_inff());
        first[j] = splat_i(0);
        partial[j] = splat(0.0f);
        total[2 * j] = total[2 * j + 1] = (vd){0};
    }
    for (int64_t k = 0; k < block->count; k++) {
        const int64_t c = block->classes ? block->classes[k] : k;
        const float top = block->c00[c], bottom = block->c10[c];
        const float top_rise = block->c01[c] - top, bottom_rise = block->c11[c] - bottom;
        const vi slot = splat_i((int32_t)k);
        for (int64_t j = 0; j < n; j++) {
            const vf upper = top + wx[j] * top_rise, lower = bottom + wx[j] * bottom_rise;
            const vf v = upper + wy[j] * (lower - upper);
            const lanes_t higher = greater(v, best[j]);
            best[j] = pick_f(higher, v, best[j]);
            first[j] = pick_i(higher, slot, first[j]);
            if (with_scores) partial[j] += floored_exp(v);
        }
        if (with_scores && (k % PARTIAL == PARTIAL - 1 || k == block->count - 1)) {
            for (int64_t j = 0; j < n; j++) {
                carry(partial[j], total + 2 * j);
                partial[j] = splat(0.0f);
            }
        }
    }
}

/* The floor of the cell whose left corners are at top / bottom (right: floats to its right corners): the
   largest over classes of the class's smallest corner (kept_classes's floor). */
static float cell_floor(const float* top, const float* bottom, int64_t C, int64_t right) {
    const int64_t whole = C - C % L;
    vf floor_v = splat(-__builtin_inff());
    for (int64_t c = 0; c < whole; c += L) {
        vf a, b, d, e;
        __builtin_memcpy(&a, top + c, sizeof a);
        __builtin_memcpy(&b, top + c + right, sizeof b);
        __builtin_memcpy(&d, bottom + c, sizeof d);
        __builtin_memcpy(&e, bottom + c + right, sizeof e);
        vf low = select_f(a < b, a, b);
        low = select_f(d < low, d, low);
        low = select_f(e < low, e, low);
        floor_v = select_f(low > floor_v, low, floor_v);
    }
    float floor = -__builtin_inff();
    for (int l = 0; l < L; l++) floor = floor_v[l] > floor ? floor_v[l] : floor;
    for (int64_t c = whole; c < C; c++) {
        float low = top[c] < top[c + right] ? top[c] : top[c + right];
        low = bottom[c] < low ? bottom[c] : low;
        low = bottom[c + right] < low ? bottom[c + right] : low;
        floor = low > floor ? low : floor;
    }
    return floor;
}

/* The classes a block evaluates (kernels/scores.py's bound): every pixel of it is a convex combination of
   its four corners, so class c is at most hi_c = max of its corners and the winner at least floor =
   max_c min of its corners; c is kept when hi_c - floor >= bound. Writes them ascending into classes and
   returns their number (never 0: the class whose lowest corner is the floor has hi_c >= floor). */
static int64_t kept_classes(const Block* block, int64_t C, float bound, int32_t* classes) {
    const float *c00 = block->c00, *c01 = block->c01, *c10 = block->c10, *c11 = block->c11;
    const float floor = cell_floor(c00, c10, C, c01 - c00); /* c11 - c10 is the same step */
    int64_t c;
    int64_t count = 0;
    for (c = 0; c < C; c++) {
        float high = c00[c] > c01[c] ? c00[c] : c01[c];
        high = c10[c] > high ? c10[c] : high;
        high = c11[c] > high ? c11[c] : high;
        if (high - floor >= bound) classes[count++] = (int32_t)c;
    }
    return count;
}

/* Scores of one vector whose peak is far below 0: each lane's peak subtracted from its exponents. */
static void shifted_scores(const Block* block, vf wy, vf wx, vf peak, float* out) {
    vd total[2] = {(vd){0}, (vd){0}};
    vf partial = splat(0.0f);
    for (int64_t k = 0; k < block->count; k++) {
        const int64_t c = block->classes ? block->classes[k] : k;
        const float top = block->c00[c], bottom = block->c10[c];
        const float top_rise = block->c01[c] - top, bottom_rise = block->c11[c] - bottom;
        const vf upper = top + wx * top_rise, lower = bottom + wx * bottom_rise;
        partial += floored_exp(upper + wy * (lower - upper) - peak);
        if (k % PARTIAL == PARTIAL - 1 || k == block->count - 1) {
            carry(partial, total);
            partial = splat(0.0f);
        }
    }
    for (int l = 0; l < 8; l++) {
        out[l] = (float)(1.0 / total[0][l]);
        out[l + 8] = (float)(1.0 / total[1][l]);
    }
}

/* Labels (and scores) of every block of the given row segments and all column segments, one image.

   grid: [points, grid_w, C] float32, class innermost. Row segment s (s < row_segments)
   covers output rows row_index[s * depth_y + t] (t < depth_y; a short segment repeats its last row) at
   weights row_weight[...] between grid rows row_cell[s] and row_cell[s] + row_upper; column segment s
   likewise (all col_segments of them). prune: each block evaluates the classes kept_classes keeps with
   bound, as a list where they are fewer than dense * C, else every class (prune 0: every class).
   labels / scores: the image's [H, width], written at each pixel (scores only if with_scores). work:
   64-byte aligned, pacl_native_work_floats() floats; classes: C int32 of room. Returns the (lane,
   class) evaluations, spare lanes included. */
int64_t pacl_native_work_floats(void) { return 9 * CHUNK * L; }

int64_t pacl_segment_blocks(const float* grid, int64_t grid_w, int64_t num_classes, int64_t row_segments,
                            const int64_t* row_cell, const int64_t* row_index,
                            const float* row_weight, int64_t depth_y, int64_t row_upper, int64_t col_segments,
                            const int64_t* col_cell, const int64_t* col_index, const float* col_weight,
                            int64_t depth_x, int64_t col_upper, int64_t prune, float bound, float dense,
                            int64_t with_scores, int64_t width, int16_t* labels, float* scores, float* work,
                            int32_t* classes) {
    int64_t evaluated = 0;
    const int64_t C = num_classes, plane = grid_w * C, pixels = depth_y * depth_x;
    vf* wy = (vf*)work;
    vf* wx = wy + CHUNK;
    vf* best = wx + CHUNK;
    vi* first = (vi*)(best + CHUNK);
    vf* partial = (vf*)(first + CHUNK);
    vd* total = (vd*)(partial + CHUNK);       /* 2 * CHUNK */
    int64_t* at = (int64_t*)(total + 2 * CHUNK); /* CHUNK * L output offsets (2 * CHUNK vectors' room) */
    float* wy_lanes = (float*)wy;
    float* wx_lanes = (float*)wx;
    for (int64_t s = 0; s < row_segments; s++) {
        const int64_t* ys = row_index + s * depth_y;
        const float* row_weights = row_weight + s * depth_y;
        const float* top = grid + row_cell[s] * plane;
        const float* bottom = top + row_upper * plane;
        for (int64_t cs = 0; cs < col_segments; cs++) {
            const int64_t* xs = col_index + cs * depth_x;
            const float* col_weights = col_weight + cs * depth_x;
            Block block;
            block.c00 = top + col_cell[cs] * C;
            block.c10 = bottom + col_cell[cs] * C;
            block.c01 = block.c00 + col_upper * C;
            block.c11 = block.c10 + col_upper * C;
            block.classes = 0;
            block.count = C;
            if (prune) {
                const int64_t count = kept_classes(&block, C, bound, classes);
                if (count > 0 && (float)count < dense * (float)C) {
                    block.classes = classes;
                    block.count = count;
                }
            }
            int64_t y = 0, x = 0; /* the block's pixel in lane 0 of the next chunk */
            for (int64_t start = 0; start < pixels; start += CHUNK * L) {
                const int64_t lanes = pixels - start < CHUNK * L ? pixels - start : CHUNK * L;
                const int64_t n = (lanes + L - 1) / L;
                evaluated += n * L * block.count;
                for (int64_t l = 0; l < lanes; l++) {
                    wy_lanes[l] = row_weights[y];
                    wx_lanes[l] = col_weights[x];
                    at[l] = ys[y] * width + xs[x];
                    if (++x == depth_x) {
                        x = 0;
                        y++;
                    }
                }
                for (int64_t l = lanes; l < n * L; l++) { /* spare lanes: copies of the last pixel, not written */
                    wy_lanes[l] = wy_lanes[lanes - 1];
                    wx_lanes[l] = wx_lanes[lanes - 1];
                }
                if (with_scores)
                    evaluate(&block, n, wy, wx, best, first, partial, total, 1);
                else
                    evaluate(&block, n, wy, wx, best, first, partial, total, 0);
                for (int64_t j = 0; j < n; j++) {
                    const vi slots = first[j];
                    const int64_t* pixel = at + j * L;
                    const int used = lanes - j * L < L ? (int)(lanes - j * L) : L;
                    if (with_scores) {
                        float score[L];
                        const vf peak = best[j];
                        int low = 0;
                        for (int l = 0; l < L; l++) low |= peak[l] < UNDERFLOW;
                        if (low) {
                            shifted_scores(&block, wy[j], wx[j], peak, score);
                        } else {
                            const vf top_term = floored_exp(peak);
                            for (int l = 0; l < 8; l++) {
                                score[l] = (float)((double)top_term[l] / total[2 * j][l]);
                                score[l + 8] = (float)((double)top_term[l + 8] / total[2 * j + 1][l]);
                            }
                        }
                        for (int l = 0; l < used; l++) scores[pixel[l]] = score[l];
                    }
                    for (int l = 0; l < used; l++)
                        labels[pixel[l]] = (int16_t)(block.classes ? block.classes[slots[l]] : slots[l]);
                }
            }
        }
    }
    return evaluated;
}
/* ---- Strips: scores where exps are geometric progressions down the rows ----

   A row segment's pixels, 16 consecutive output columns at a time (a *group*, spanning up to GROUP_CELLS cells,
   each lane with its own cell's corners), one output row per vector. Down a column of one cell, a class's value
   v_j = upper + wy_j * delta is linear in the row weight, so where the weights step evenly (wy_j = wy_s +
   (j - s) * step + off_j, off_j the float32 weights' departure from the even step, known per row) its term is
   exp(v_s) * ratio^(j - s) * exp(off_j * delta), ratio = exp(step * delta): two exps per class per lane for
   a chain of rows, then one multiply per row (and 1 + off_j * delta, first order: |off_j * delta| <= 87 *
   MAX_STEP_ERROR, so the dropped second order is under 4e-7 of a term). A chain restarts with an exact exp
   every RESTART rows, so that the multiplies' rounding (~1.6e-7 of a term per row, the ratio's included)
   stays under ~1.1e-6 of a term, under ~3e-7 of a score (a score moves by at most a quarter of its terms'
   common error). Geometric only where no evaluated class goes below FLOOR + 1 in the group (no clamped term,
   no denormal product: terms stay in [exp(-87), 1]) and the steps are even to MAX_STEP_ERROR; elsewhere
   (border segments, huge slopes) every term is an exact exp, as pacl_segment_blocks computes it.

   Rows run PASS at a time with their accumulators in registers, classes inside; each class's lane values
   (upper, delta, ratio, the chain's next term) wait in `table` between passes. */

#define GROUP_CELLS 4
#define PASS 4
#define RESTART 8
#define CHUNK_ROWS 16
#define MAX_STEP_ERROR 1e-5

typedef struct {
    const float* top;    /* the segment's refined row: [grid_w, C] */
    const float* bottom; /* its second row */
    int64_t C, right;    /* classes; floats from a cell's left corner to its right one (col_upper * C) */
    int64_t first, cells, lanes, x0;
    vi mask[GROUP_CELLS]; /* lanes in each cell (mask[0] unused: the default) */
    vf wx;
} Group;

typedef struct {
    float wy[CHUNK_ROWS + PASS];  /* each row's weight (rows past the chunk repeat its last) */
    float off[CHUNK_ROWS + PASS]; /* its departure from the even step, from its chain's first row */
    const int64_t* ys;            /* the chunk's output rows */
    int64_t rows;
    float step;
    int geometric, corrected;
} Rows;

static inline __attribute__((always_inline)) void lane_values(const Group* g, int64_t c, vf* upper, vf* delta) {
    const float *top = g->top + g->first * g->C + c, *bottom = g->bottom + g->first * g->C + c;
    vf a = splat(top[0]), b = splat(top[g->right]), d = splat(bottom[0]), e = splat(bottom[g->right]);
    for (int64_t t = 1; t < g->cells; t++) {
        const int64_t at = t * g->C;
        a = select_f(g->mask[t], splat(top[at]), a);
        b = select_f(g->mask[t], splat(top[at + g->right]), b);
        d = select_f(g->mask[t], splat(bottom[at]), d);
        e = select_f(g->mask[t], splat(bottom[at + g->right]), e);
    }
    const vf up = a + g->wx * (b - a), low = d + g->wx * (e - d); /* pacl_segment_blocks's upper and lower */
    *upper = up;
    *delta = low - up;
}

/* Each class's lane values into table (upper, delta; geometric: the ratio and the first row's term), before a
   chunk's passes, so that the passes hold their accumulators in registers and take no exp. */
static void prepare_classes(const Group* g, const int32_t* classes, int64_t count, const Rows* rows, vf* table,
                            int geometric) {
    const vf step = splat(rows->step);
    for (int64_t k = 0; k < count; k++) {
        vf* saved = table + 4 * k;
        vf upper, delta;
        lane_values(g, classes ? classes[k] : k, &upper, &delta);
        saved[0] = upper;
        saved[1] = delta;
        if (geometric) {
            saved[2] = exp_below_zero(step * delta); /* |step * delta| <= 87: as exact as for x <= 0 */
            saved[3] = exp_below_zero(upper + rows->wy[0] * delta);
        }
    }
}

/* A chain restarting at row j: each class's term there, an exact exp. */
static void restart_chains(int64_t count, const Rows* rows, int64_t j, vf* table) {
    for (int64_t k = 0; k < count; k++) {
        vf* saved = table + 4 * k;
        saved[3] = exp_below_zero(saved[0] + rows->wy[j] * saved[1]);
    }
}

/* Rows j0 .. j0 + real - 1 of the chunk (real <= PASS; the pass's other rows repeat the last, unwritten), every
   class from table. mode 0: exact exps; 1: geometric (each class's chain term from table, advanced); 2: geometric
   with each row's off. */
static inline __attribute__((always_inline)) void evaluate_pass(const int32_t* classes, int64_t count,
                                                                const Rows* rows, int64_t j0, int64_t real, vf* table,
                                                                const int mode, vf* best, vi* first, vf* top_term,
                                                                vd* total) {
    (void)classes;
    /* Accumulators in registers (16 of AVX-512's 32); best, first and top_term written at the end, the double
       sums (touched every PARTIAL classes) kept in memory. */
    vf partial[PASS], high[PASS], term_of[PASS];
    vi slot_of[PASS];
    for (int j = 0; j < PASS; j++) {
        high[j] = splat(-__builtin_inff());
        slot_of[j] = splat_i(0);
        term_of[j] = partial[j] = splat(0.0f);
        total[2 * j] = total[2 * j + 1] = (vd){0};
    }
    float wy[PASS], off[PASS];
    for (int j = 0; j < PASS; j++) {
        wy[j] = rows->wy[j0 + j];
        off[j] = rows->off[j0 + j];
    }
    for (int64_t k = 0; k < count; k++) {
        vf* saved = table + 4 * k;
        const vf upper = saved[0], delta = saved[1];
        vf ratio = splat(1.0f), term = splat(0.0f);
        if (mode) {
            ratio = saved[2];
            term = saved[3];
        }
        const vi slot = splat_i((int32_t)k);
        for (int j = 0; j < PASS; j++) {
            const vf v = upper + wy[j] * delta;
            const lanes_t higher = greater(v, high[j]);
            high[j] = pick_f(higher, v, high[j]);
            slot_of[j] = pick_i(higher, slot, slot_of[j]);
            vf here;
            if (!mode) {
                here = floored_exp(v);
            } else {
                here = mode == 2 ? term + term * (off[j] * delta) : term;
                if (j + 1 < real) term *= ratio;
            }
            term_of[j] = pick_f(higher, here, term_of[j]);
            partial[j] += here;
        }
        if (mode && real == PASS) saved[3] = term * ratio;
        if (k % PARTIAL == PARTIAL - 1 || k == count - 1) {
            for (int j = 0; j < PASS; j++) {
                carry(partial[j], total + 2 * j);
                partial[j] = splat(0.0f);
            }
        }
    }
    for (int j = 0; j < PASS; j++) {
        best[j] = high[j];
        first[j] = slot_of[j];
        top_term[j] = term_of[j];
    }
}

/* Scores of one row whose peak is far below 0 (exact exps only): each lane's peak subtracted. */
static void group_shifted_scores(const Group* g, const int32_t* classes, int64_t count, float wy, vf peak,
                                 float* out) {
    vd total[2] = {(vd){0}, (vd){0}};
    vf partial = splat(0.0f);
    for (int64_t k = 0; k < count; k++) {
        vf upper, delta;
        lane_values(g, classes ? classes[k] : k, &upper, &delta);
        partial += floored_exp(upper + wy * delta - peak);
        if (k % PARTIAL == PARTIAL - 1 || k == count - 1) {
            carry(partial, total);
            partial = splat(0.0f);
        }
    }
    for (int l = 0; l < 8; l++) {
        out[l] = (float)(1.0 / total[0][l]);
        out[l + 8] = (float)(1.0 / total[1][l]);
    }
}

/* Per class c (vectors of 16 classes from c0, or 1 class: n = 1) of cell t of the group: its smallest and
   largest corner. */
static inline void corner_range(const Group* g, int64_t t, int64_t c, vf* low, vf* high) {
    const float *above = g->top + (g->first + t) * g->C + c, *below = g->bottom + (g->first + t) * g->C + c;
    vf a, b, d, e;
    __builtin_memcpy(&a, above, sizeof a);
    __builtin_memcpy(&b, above + g->right, sizeof b);
    __builtin_memcpy(&d, below, sizeof d);
    __builtin_memcpy(&e, below + g->right, sizeof e);
    vf least = select_f(a < b, a, b), most = select_f(a > b, a, b);
    least = select_f(d < least, d, least);
    most = select_f(d > most, d, most);
    least = select_f(e < least, e, least);
    most = select_f(e > most, e, most);
    *low = least;
    *high = most;
}

static inline void corner_range_1(const Group* g, int64_t t, int64_t c, float* low, float* high) {
    const float *above = g->top + (g->first + t) * g->C + c, *below = g->bottom + (g->first + t) * g->C + c;
    float least = above[0] < above[g->right] ? above[0] : above[g->right];
    float most = above[0] > above[g->right] ? above[0] : above[g->right];
    least = below[0] < least ? below[0] : least;
    most = below[0] > most ? below[0] : most;
    least = below[g->right] < least ? below[g->right] : least;
    most = below[g->right] > most ? below[g->right] : most;
    *low = least;
    *high = most;
}

/* The group's classes: those some cell of it keeps (kept_classes's rule, per cell: largest corner at least
   the cell's floor plus bound), ascending, into classes. Returns their number, or -C for every class (no list:
   prune 0, or at least dense * C kept), and in lowest the smallest corner among the classes it evaluates. */
static int64_t group_classes(const Group* g, const float* floors, int prune, float bound, float dense,
                             int32_t* classes, float* lowest) {
    const int64_t C = g->C, whole = C - C % L;
    const float* floor = floors + g->first; /* each cell's, computed once per row segment */
    int64_t count = 0;
    vf kept_low = splat(__builtin_inff()), all_low = splat(__builtin_inff());
    float kept_tail = __builtin_inff(), all_tail = __builtin_inff();
    for (int64_t c = 0; c < whole; c += L) {
        vi keep = splat_i(prune ? 0 : -1);
        vf least = splat(__builtin_inff()), low, high;
        for (int64_t t = 0; t < g->cells; t++) {
            corner_range(g, t, c, &low, &high);
            keep |= high - floor[t] >= bound;
            least = select_f(low < least, low, least);
        }
        all_low = select_f(least < all_low, least, all_low);
        kept_low = select_f(keep & (least < kept_low), least, kept_low);
#if defined(__AVX512F__) /* the kept lanes' classes, packed: one compressing store */
        const __mmask16 kept = _mm512_test_epi32_mask((__m512i)keep, (__m512i)keep);
        const vi lane_class = splat_i((int32_t)c) + (vi){0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
        _mm512_mask_compressstoreu_epi32(classes + count, kept, (__m512i)lane_class);
        count += __builtin_popcount((unsigned)kept);
#else
        for (int l = 0; l < L; l++) {
            classes[count] = (int32_t)(c + l);
            count += keep[l] & 1;
        }
#endif
    }
    for (int64_t c = whole; c < C; c++) {
        int keep = !prune;
        float least = __builtin_inff(), low, high;
        for (int64_t t = 0; t < g->cells; t++) {
            corner_range_1(g, t, c, &low, &high);
            keep |= high - floor[t] >= bound;
            least = low < least ? low : least;
        }
        all_tail = least < all_tail ? least : all_tail;
        if (keep) {
            classes[count++] = (int32_t)c;
            kept_tail = least < kept_tail ? least : kept_tail;
        }
    }
    float every = all_tail, kept = kept_tail;
    for (int l = 0; l < L; l++) {
        every = all_low[l] < every ? all_low[l] : every;
        kept = kept_low[l] < kept ? kept_low[l] : kept;
    }
    if (!prune || (float)count >= dense * (float)C) {
        *lowest = every;
        return -C;
    }
    *lowest = kept;
    return count;
}

typedef int16_t vs __attribute__((vector_size(32)));

/* One row of a group: labels (slots through the class list) and scores (the winner's term over the sum; an
   exact row whose peak is below UNDERFLOW again with its peak subtracted), whole vectors where 16 lanes are. */
static inline void write_row(const Group* g, const int32_t* list, int16_t* label_row, float* score_row, vi slots,
                             vf top_term, const vd* total, vf peak, int exact, int64_t count, float wy) {
    vf score;
    int low = 0;
    for (int l = 0; l < L; l++) low |= peak[l] < UNDERFLOW;
    if (low && exact) {
        float shifted[L];
        group_shifted_scores(g, list, count, wy, peak, shifted);
        __builtin_memcpy(&score, shifted, sizeof score);
    } else {
        vf8 low_half, high_half;
        __builtin_memcpy(&low_half, &top_term, 32);
        __builtin_memcpy(&high_half, (char*)&top_term + 32, 32);
        const vf8 a = __builtin_convertvector(__builtin_convertvector(low_half, vd) / total[0], vf8);
        const vf8 b = __builtin_convertvector(__builtin_convertvector(high_half, vd) / total[1], vf8);
        __builtin_memcpy(&score, &a, 32);
        __builtin_memcpy((char*)&score + 32, &b, 32);
    }
    vi label = slots;
    if (list)
        for (int l = 0; l < L; l++) label[l] = list[slots[l]];
    if (g->lanes == L) {
        const vs narrow = __builtin_convertvector(label, vs);
        __builtin_memcpy(label_row, &narrow, sizeof narrow);
        __builtin_memcpy(score_row, &score, sizeof score);
    } else {
        for (int l = 0; l < g->lanes; l++) {
            label_row[l] = (int16_t)label[l];
            score_row[l] = score[l];
        }
    }
}

int64_t pacl_native_strip_floats(int64_t num_classes, int64_t grid_w) { return 4 * L * num_classes + grid_w; }

/* Labels and scores of every pixel of the given row segments, one image, by strips (above).

   grid: [points, grid_w, C] float32, class innermost (fine_grid.relative_logits: every value at most 0). Row
   segment s: as pacl_segment_blocks (a short segment repeats its last row: only its distinct rows are
   evaluated). Columns: output column x samples cells col_cell[x] and col_cell[x] + col_upper at weight
   col_weight[x]; the cells of 16 consecutive columns are ascending and span at most GROUP_CELLS (the caller
   checks). prune, bound, dense: as pacl_segment_blocks, per group (a class some cell of it keeps). geometric 0:
   exact exps everywhere. work: pacl_native_work_floats() floats, table: pacl_native_strip_floats(C, grid_w), both
   64-byte aligned; classes: C int32. Returns the (lane, class) evaluations, spare lanes and rows included. */
int64_t pacl_segment_strips(const float* grid, int64_t grid_w, int64_t num_classes, int64_t row_segments,
                            const int64_t* row_cell, const int64_t* row_index, const float* row_weight,
                            int64_t depth_y, int64_t row_upper, int64_t width, const int64_t* col_cell,
                            const float* col_weight, int64_t col_upper, int64_t prune, float bound, float dense,
                            int64_t geometric, int16_t* labels, float* scores, float* work, float* table_floats,
                            int32_t* classes) {
    int64_t evaluated = 0;
    const int64_t C = num_classes, plane = grid_w * C;
    vf* best = (vf*)work;
    vi* first = (vi*)(best + PASS);
    vf* top_term = (vf*)(first + PASS);
    vd* total = (vd*)(top_term + PASS); /* 2 * PASS */
    vf* table = (vf*)table_floats;
    float* floors = table_floats + 4 * L * C; /* each cell's floor, for the row segment at hand */
    Group g = {0};
    Rows rows = {0};
    g.C = C;
    g.right = col_upper * C;
    for (int64_t s = 0; s < row_segments; s++) {
        const int64_t* ys = row_index + s * depth_y;
        const float* weights = row_weight + s * depth_y;
        int64_t distinct = 1;
        while (distinct < depth_y && ys[distinct] != ys[distinct - 1]) distinct++;
        g.top = grid + row_cell[s] * plane;
        g.bottom = g.top + row_upper * plane;
        for (int64_t cell = col_cell[0]; cell <= col_cell[width - 1]; cell++)
            floors[cell] = cell_floor(g.top + cell * C, g.bottom + cell * C, C, g.right);
        for (int64_t x0 = 0; x0 < width; x0 += L) {
            g.x0 = x0;
            g.lanes = width - x0 < L ? width - x0 : L;
            g.first = col_cell[x0];
            g.cells = col_cell[x0 + g.lanes - 1] - g.first + 1;
            vi lane_cell = splat_i(0);
            for (int l = 0; l < L; l++) {
                const int64_t x = x0 + (l < g.lanes ? l : g.lanes - 1);
                g.wx[l] = col_weight[x];
                lane_cell[l] = (int32_t)(col_cell[x] - g.first);
            }
            for (int64_t t = 1; t < g.cells; t++) g.mask[t] = lane_cell == splat_i((int32_t)t);
            float lowest;
            int64_t count = group_classes(&g, floors, (int)prune, bound, dense, classes, &lowest);
            const int32_t* list = count < 0 ? 0 : classes;
            count = count < 0 ? -count : count;
            for (int64_t r0 = 0; r0 < distinct; r0 += CHUNK_ROWS) {
                rows.ys = ys + r0;
                rows.rows = distinct - r0 < CHUNK_ROWS ? distinct - r0 : CHUNK_ROWS;
                const double span = rows.rows > 1 ? (double)weights[r0 + rows.rows - 1] - (double)weights[r0] : 0.0;
                rows.step = (float)(rows.rows > 1 ? span / (double)(rows.rows - 1) : 0.0);
                int even = 1, corrected = 0;
                for (int64_t j = 0; j < CHUNK_ROWS + PASS; j++) {
                    const int64_t at = r0 + (j < rows.rows ? j : rows.rows - 1);
                    const int64_t start = r0 + (j < rows.rows ? j - j % RESTART : 0);
                    rows.wy[j] = weights[at];
                    double off = j < rows.rows ? (double)weights[at] - ((double)weights[start] +
                                                 (double)(at - start) * (double)rows.step) : 0.0;
                    if (off < 1e-30 && off > -1e-30) off = 0.0;
                    even &= off <= MAX_STEP_ERROR && off >= -MAX_STEP_ERROR;
                    corrected |= off != 0.0;
                    rows.off[j] = (float)off;
                }
                rows.geometric = geometric && even && lowest >= FLOOR + 1.0f;
                rows.corrected = corrected;
                const int mode = rows.geometric ? (corrected ? 2 : 1) : 0;
                prepare_classes(&g, list, count, &rows, table, rows.geometric);
                for (int64_t j0 = 0; j0 < rows.rows; j0 += PASS) {
                    const int64_t real = rows.rows - j0 < PASS ? rows.rows - j0 : PASS;
                    if (mode && j0 > 0 && j0 % RESTART == 0) restart_chains(count, &rows, j0, table);
                    evaluated += PASS * L * count;
                    if (mode == 0)
                        evaluate_pass(list, count, &rows, j0, real, table, 0, best, first, top_term, total);
                    else if (mode == 1)
                        evaluate_pass(list, count, &rows, j0, real, table, 1, best, first, top_term, total);
                    else
                        evaluate_pass(list, count, &rows, j0, real, table, 2, best, first, top_term, total);
                    for (int64_t j = 0; j < real; j++)
                        write_row(&g, list, labels + rows.ys[j0 + j] * width + g.x0,
                                  scores + rows.ys[j0 + j] * width + g.x0, first[j], top_term[j], total + 2 * j,
                                  best[j], !rows.geometric, count, rows.wy[j0 + j]);
                }
            }
        }
    }
    return evaluated;
}
/* ---- fine_grid.relative_logits, bit for bit ----

   Rows first .. first + rows - 1 of one image's grid refined `factor` times (every refined column): each point's
   classes minus their largest, times scale, in double, rounded once to float. The same operations in the same
   order as fine_grid's torch code: the values read as double; between two grid points k / factor of the way,
   ATen's lerp (start + w * (end - start) for w < 0.5, else end - (end - start) * (1 - w); both products exact,
   as w is a multiple of 1 / factor, a power of two), first along the rows, then along the columns; the
   largest class (NaN if any is: as torch.amax), subtracted, then the scale. So the same bits, one pass.
   values: [h, w, C] float32; out: [rows, (w - 1) * factor + 1, C] float32; line: 2 * w * C doubles. */
static inline double lerp_exact(double start, double end, double weight) {
    return weight < 0.5 ? start + weight * (end - start) : end - (end - start) * (1.0 - weight);
}

/* Lanes of 8 doubles: the largest so far and whether any was NaN. */
static inline void track_largest(vd here, vd* most, vl* odd) {
    const vl higher = here > *most;
    *most = (vd)(((vl)here & higher) | ((vl)*most & ~higher));
    *odd |= here != here;
}

void pacl_relative_logits(const float* values, int64_t h, int64_t w, int64_t C, int64_t first, int64_t rows,
                          int64_t factor, double scale, float* out, double* line) {
    (void)h;
    const int64_t fine_w = (w - 1) * factor + 1, whole = C - C % 8;
    double* point = line + w * C;
    for (int64_t r = 0; r < rows; r++) {
        const int64_t at = first + r, a = at / factor, s = at % factor;
        const float* top = values + a * w * C;
        if (s == 0) {
            for (int64_t i = 0; i < w * C; i++) line[i] = (double)top[i];
        } else {
            const float* bottom = top + w * C;
            const double weight = (double)s / (double)factor;
            for (int64_t i = 0; i < w * C; i++) line[i] = lerp_exact((double)top[i], (double)bottom[i], weight);
        }
        for (int64_t q = 0; q < fine_w; q++) {
            const int64_t j = q / factor, t = q % factor;
            const double* left = line + j * C;
            const double* values_here = left; /* a grid column: the line itself */
            vd most = (vd){0} - __builtin_inf();
            vl odd = (vl){0};
            if (t == 0) {
                for (int64_t c = 0; c < whole; c += 8) {
                    vd here;
                    __builtin_memcpy(&here, left + c, sizeof here);
                    track_largest(here, &most, &odd);
                }
            } else {
                const double weight = (double)t / (double)factor;
                const vd weight_v = (vd){0} + weight, rest_v = (vd){0} + (1.0 - weight);
                for (int64_t c = 0; c < whole; c += 8) {
                    vd start, end;
                    __builtin_memcpy(&start, left + c, sizeof start);
                    __builtin_memcpy(&end, left + c + C, sizeof end);
                    /* lerp_exact, lane-wise: the weight is the same for every lane */
                    const vd here = weight < 0.5 ? start + weight_v * (end - start) : end - (end - start) * rest_v;
                    __builtin_memcpy(point + c, &here, sizeof here);
                    track_largest(here, &most, &odd);
                }
                for (int64_t c = whole; c < C; c++) point[c] = lerp_exact(left[c], left[c + C], weight);
                values_here = point;
            }
            double largest = -__builtin_inf();
            int nan = 0;
            for (int l = 0; l < 8; l++) {
                largest = most[l] > largest ? most[l] : largest;
                nan |= odd[l] != 0;
            }
            for (int64_t c = whole; c < C; c++) {
                largest = values_here[c] > largest ? values_here[c] : largest;
                nan |= values_here[c] != values_here[c];
            }
            if (nan) largest = __builtin_nan(""); /* as torch.amax */
            float* o = out + (r * fine_w + q) * C;
            const vd largest_v = (vd){0} + largest, scale_v = (vd){0} + scale;
            for (int64_t c = 0; c < whole; c += 8) {
                vd here;
                __builtin_memcpy(&here, values_here + c, sizeof here);
                const vf8 rounded = __builtin_convertvector((here - largest_v) * scale_v, vf8);
                __builtin_memcpy(o + c, &rounded, sizeof rounded);
            }
            for (int64_t c = whole; c < C; c++) o[c] = (float)((values_here[c] - largest) * scale);
        }
    }
}
"""
