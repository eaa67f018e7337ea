// Fused decode step of power retention, one token, fp32 state:
//   S <- g S + phi(k) v^T,  z <- g z + phi(k),  y = (phi(q).(g S) + (q.k)^p v) / (phi(q).(g z) + (q.k)^p)
// with q prepared as the MLX path prepares it (scaled, or divided by its largest entry when
// normalized). The features phi are computed on the fly (sympow.h); they are never stored.
// The state is split into tiles of TILE features so that even batch 1 fills the GPU: one
// threadgroup of E threads per (batch and key/value head, tile). It stages q and k once in
// threadgroup memory as float; thread m then owns value column m of its tile of the state
// and serves the G query heads that share this key/value head. Each tile writes its share of
// the numerator and denominator; the dispatch sums the shares and divides. The token's own
// weight (q.k)^p is computed directly (by tile 0), as the MLX path does, so the first token
// gives y = v exactly.
// Template: T (dtype of k and v), DEG, DIM (head width d), E (value width), G (query heads per
// kv head), FEATURES (D), TILE (features per threadgroup).
// Inputs (row contiguous): q (B, H*G, DIM): float; k (B, H, DIM), v (B, H, E): T;
// decay (B, H) = exp(log_g), S (B, H, FEATURES, E), z (B, H, FEATURES): float.
// Outputs (float): S_out, z_out shaped like S and z; numerator (TILES, B, H*G, E) and
// denominator (TILES, B, H*G), each tile's share.
uint m = thread_position_in_threadgroup.x;
uint bh = threadgroup_position_in_grid.x;
uint tile = threadgroup_position_in_grid.y;
uint heads = threadgroups_per_grid.x;  // B * H
int first = int(tile) * TILE;

threadgroup float q_tile[G * DIM];
threadgroup float k_tile[DIM];
for (uint i = m; i < G * DIM; i += E) {
    q_tile[i] = q[bh * G * DIM + i];
}
for (uint i = m; i < DIM; i += E) {
    k_tile[i] = float(k[bh * DIM + i]);
}
threadgroup_barrier(mem_flags::mem_threadgroup);

float g = decay[bh];
float v_m = float(v[bh * E + m]);
float num[G];
float den[G];
for (int h = 0; h < G; ++h) {
    num[h] = 0.0f;
    den[h] = 0.0f;
}
FeatureCursor<DEG, DIM> feature;
feature.seek(first);
for (int j = 0; j < TILE && first + j < FEATURES; ++j) {
    if (j > 0) {
        feature.advance();
    }
    int p = first + j;
    float phi_k = feature.value(k_tile);
    float s_decayed = g * S[(bh * FEATURES + p) * E + m];
    float z_decayed = g * z[bh * FEATURES + p];
    for (int h = 0; h < G; ++h) {
        float phi_q = feature.value(q_tile + h * DIM);
        num[h] += phi_q * s_decayed;
        den[h] += phi_q * z_decayed;
    }
    S_out[(bh * FEATURES + p) * E + m] = s_decayed + phi_k * v_m;
    if (m == 0) {
        z_out[bh * FEATURES + p] = z_decayed + phi_k;
    }
}
for (int h = 0; h < G; ++h) {
    if (tile == 0) {
        float dot = 0.0f;
        for (int i = 0; i < DIM; ++i) {
            dot += q_tile[h * DIM + i] * k_tile[i];
        }
        float own = 1.0f;
        for (int t = 0; t < DEG; ++t) {
            own *= dot;
        }
        num[h] += own * v_m;
        den[h] += own;
    }
    uint row = (tile * heads + bh) * G + h;
    numerator[row * E + m] = num[h];
    if (m == 0) {
        denominator[row] = den[h];
    }
}
