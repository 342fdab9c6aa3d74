"""The C source of the native CPU kernel (``kernels/native.py`` compiles and loads it).

A Python string rather than a ``.c`` file so that it ships wherever the package does (setup.py lists
no data files for ``kernels``). Plain C with GCC/Clang vector extensions, no headers but ``stdint.h``
and no library calls: the compiler maps the 16-lane vectors onto whatever the CPU has (AVX-512: one
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

**Precision.** ``exp_below_zero``: Cody-Waite reduction and Cephes' degree-6 polynomial, relative
error under 1e-7 (``tests/test_head_kernels.py`` measures it against float64). Sums run in float
over ``PARTIAL`` classes, then in double, so that their rounding does not grow with ``C``.
"""

SOURCE = r"""
#include <stdint.h>

typedef float vf __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));
typedef double vd __attribute__((vector_size(64)));
typedef float vf8 __attribute__((vector_size(32)));
#define L 16            /* lanes of a vector */
#define CHUNK 16        /* vectors of pixels evaluated together: 256 pixels */
#define PARTIAL 8       /* classes summed in float before the sum goes on in double */
#define FLOOR (-87.0f)  /* lowest exponent given to exp: exp(-87) ~ 1.6e-38 */
#define UNDERFLOW (-40.0f)

/* Bump with any change of an exported signature: native.py refuses a library of another version. */
int64_t pacl_native_abi(void) { return 3; }

static inline vf splat(float x) { return (vf){0} + x; }
static inline vi splat_i(int32_t x) { return (vi){0} + x; }
static inline vf select_f(vi m, vf a, vf b) { return (vf)(((vi)a & m) | ((vi)b & ~m)); }
static inline vi select_i(vi m, vi a, vi b) { return (a & m) | (b & ~m); }

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

/* total (two double vectors: lanes 0-7, 8-15) += partial. */
static inline void carry(vf partial, vd* total) {
    vf8 low, high;
    __builtin_memcpy(&low, &partial, 32);
    __builtin_memcpy(&high, (char*)&partial + 32, 32);
    total[0] += __builtin_convertvector(low, vd);
    total[1] += __builtin_convertvector(high, vd);
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
            const vi higher = v > best[j];
            best[j] = select_f(higher, v, best[j]);
            first[j] = select_i(higher, slot, first[j]);
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

/* The classes a block evaluates (kernels/scores.py's bound): every pixel of it is a convex combination of
   its four corners, so class c is at most hi_c = max of its corners and the winner at least floor =
   max_c min of its corners; c is kept when hi_c - floor >= bound. Writes them ascending into classes and
   returns their number (never 0: the class whose lowest corner is the floor has hi_c >= floor). */
static int64_t kept_classes(const Block* block, int64_t C, float bound, int32_t* classes) {
    const float *c00 = block->c00, *c01 = block->c01, *c10 = block->c10, *c11 = block->c11;
    vf floor_v = splat(-__builtin_inff());
    int64_t c = 0;
    for (; c + L <= C; c += L) {
        vf a, b, d, e;
        __builtin_memcpy(&a, c00 + c, sizeof a);
        __builtin_memcpy(&b, c01 + c, sizeof b);
        __builtin_memcpy(&d, c10 + c, sizeof d);
        __builtin_memcpy(&e, c11 + c, sizeof e);
        vf low = select_f(a < b, a, b);
        low = select_f(d < low, d, low);
        low = select_f(e < low, e, low);
        floor_v = select_f(low > floor_v, low, floor_v);
    }
    float floor = -__builtin_inff();
    for (int l = 0; l < L; l++) floor = floor_v[l] > floor ? floor_v[l] : floor;
    for (; c < C; c++) {
        float low = c00[c] < c01[c] ? c00[c] : c01[c];
        low = c10[c] < low ? c10[c] : low;
        low = c11[c] < low ? c11[c] : low;
        floor = low > floor ? low : floor;
    }
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

   grid: [points, grid_w, C] float32, class innermost. Row segment s (s = row_segment[i], i < row_segments)
   covers output rows row_index[s * depth_y + t] (t < depth_y; a short segment repeats its last row) at
   weights row_weight[...] between grid rows row_cell[s] and row_cell[s] + row_upper; column segment s
   likewise (all col_segments of them). prune: each block evaluates the classes kept_classes keeps with
   bound, as a list where they are fewer than dense * C, else every class (prune 0: every class).
   labels / scores: the image's [H, width], written at each pixel (scores only if with_scores). work:
   64-byte aligned, pacl_native_work_floats() floats; classes: C int32 of room. Returns the (lane,
   class) evaluations, spare lanes included. */
int64_t pacl_native_work_floats(void) { return 9 * CHUNK * L; }

int64_t pacl_segment_blocks(const float* grid, int64_t grid_w, int64_t num_classes, int64_t row_segments,
                            const int64_t* row_segment, const int64_t* row_cell, const int64_t* row_index,
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
    for (int64_t i = 0; i < row_segments; i++) {
        const int64_t s = row_segment[i];
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
"""
