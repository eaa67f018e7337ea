// Chunked prefill, query side: what each query reads from the state entering its chunk,
//   out[t, m] = sum_p phi_p(q_t) S1[p, m]   (t < C, m < E1; S1 = [S | z] gives numerator
// and denominator together), with the features computed on the fly (sympow.h).
// One threadgroup of E1 threads per (query chunk, block of ROWS queries): for each tile of
// TILE features, the block's features are computed into threadgroup memory, then thread m
// accumulates column m for the block's ROWS queries.
// Template: DEG, DIM (query width d), C (chunk length), E1 (value width + 1), FEATURES (D),
// TILE (features per pass), ROWS (queries per threadgroup), G (query chunks per state: the
// query heads sharing a key/value head).
// Inputs (row contiguous, float): q (N * G, C, DIM) queries (already decayed), S1 (N,
// FEATURES, E1) the state entering each chunk.
// Output: out (N * G, C, E1), float.
uint m = thread_position_in_threadgroup.x;
uint chunk = threadgroup_position_in_grid.x;
int row0 = int(threadgroup_position_in_grid.y) * ROWS;
uint state = chunk / G;

threadgroup float phi[TILE * ROWS];
float sums[ROWS];
for (int r = 0; r < ROWS; ++r) {
    sums[r] = 0.0f;
}
for (int first = 0; first < FEATURES; first += TILE) {
    for (uint r = m; r < ROWS; r += E1) {
        FeatureCursor<DEG, DIM> feature;
        feature.seek(first);
        int t = min(row0 + int(r), C - 1);  // rows past the chunk's end are computed, not used
        for (int j = 0; j < TILE && first + j < FEATURES; ++j) {
            if (j > 0) {
                feature.advance();
            }
            phi[j * ROWS + r] = feature.value(q + (chunk * C + t) * DIM);
        }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (int j = 0; j < TILE && first + j < FEATURES; ++j) {
        float s = S1[(state * FEATURES + first + j) * E1 + m];
        for (int r = 0; r < ROWS; ++r) {
            sums[r] += phi[j * ROWS + r] * s;
        }
    }
    // The next tile overwrites phi: every thread must be done reading it.
    threadgroup_barrier(mem_flags::mem_threadgroup);
}
for (int r = 0; r < ROWS && row0 + r < C; ++r) {
    out[(chunk * C + row0 + r) * E1 + m] = sums[r];
}
