// Chunked prefill, state side: each chunk's own contribution to the state,
//   S1[p, m] = sum_t phi_p(k_t) v1[t, m]   (p < FEATURES, m < E1; v1 = [v | 1] gives [S | z])
// with the features computed on the fly (sympow.h), never stored in device memory.
// One threadgroup of E1 threads per (chunk, tile of TILE features): the tile's features of
// the chunk's C keys are computed once into threadgroup memory, then thread m sums column m.
// Template: DEG, DIM (key width d), C (chunk length), E1 (value width + 1), FEATURES (D),
// TILE (features per threadgroup).
// Inputs (row contiguous, float): k (N, C, DIM) keys (already decayed), v1 (N, C, E1).
// Output: S1 (N, FEATURES, E1), float.
uint m = thread_position_in_threadgroup.x;
uint chunk = threadgroup_position_in_grid.x;
int first = int(threadgroup_position_in_grid.y) * TILE;

threadgroup float phi[TILE * C];
for (uint t = m; t < C; t += E1) {
    FeatureCursor<DEG, DIM> feature;
    feature.seek(first);
    for (int j = 0; j < TILE && first + j < FEATURES; ++j) {
        if (j > 0) {
            feature.advance();
        }
        phi[j * C + t] = feature.value(k + (chunk * C + t) * DIM);
    }
}
threadgroup_barrier(mem_flags::mem_threadgroup);

for (int j = 0; j < TILE && first + j < FEATURES; ++j) {
    float sum = 0.0f;
    for (int t = 0; t < C; ++t) {
        sum += phi[j * C + t] * v1[(chunk * C + t) * E1 + m];
    }
    S1[(chunk * FEATURES + first + j) * E1 + m] = sum;
}
