// Fused decode step of power retention, one token, fp32 state:
//   S <- g S + phi(k) v^T,  z <- g z + phi(k),  y = (phi(q).(g S) + (q.k)^p v) / (phi(q).(g z) + (q.k)^p)
// with q prepared as the MLX path prepares it (scaled, or divided by its largest entry when
// normalized). The features phi are computed on the fly (sympow.h);
// they are never stored. One threadgroup of E threads per (batch, key/value head): q and k
// are staged once in threadgroup memory as float, then thread m owns value column m of the
// state and serves the G query heads that share this key/value head. The token's own weight
// (q.k)^p is computed directly, as the MLX path does, so the first token gives y = v exactly.
// Template: T (dtype of k, v and y), DEG, DIM (head width d), E (value width), G (query
// heads per kv head), FEATURES (D), NORMALIZE (bool).
// Inputs (row contiguous): q (B, H*G, DIM): float; k (B, H, DIM), v (B, H, E): T;
// decay (B, H) = exp(log_g), S (B, H, FEATURES, E), z (B, H, FEATURES): float.
// Outputs: y (B, H*G, E): T; S_out, z_out shaped like S and z: float.
uint m = thread_position_in_threadgroup.x;
uint bh = threadgroup_position_in_grid.x;

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
float own[G];
float num[G];
float den[G];
for (int h = 0; h < G; ++h) {
    float dot = 0.0f;
    for (int i = 0; i < DIM; ++i) {
        dot += q_tile[h * DIM + i] * k_tile[i];
    }
    float power = 1.0f;
    for (int t = 0; t < DEG; ++t) {
        power *= dot;
    }
    own[h] = power;
    num[h] = 0.0f;
    den[h] = 0.0f;
}
FeatureCursor<DEG, DIM> feature;
for (int p = 0; p < FEATURES; ++p) {
    if (p > 0) {
        feature.advance();
    }
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
    float n = num[h] + own[h] * v_m;
    float d = den[h] + own[h];
    y[(bh * G + h) * E + m] = T(NORMALIZE ? n / (d == 0.0f ? 1.0f : d) : n);
}
