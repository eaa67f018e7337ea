// Fused decode step of power retention (degree 1 or 2), one token, fp32 state:
//   S <- g S + phi(k) v^T,  z <- g z + phi(k),  y = (phi(q).(g S) + (q.k)^p v) / (phi(q).(g z) + (q.k)^p)
// The features phi are computed on the fly from q and k; they are never stored.
// One threadgroup per (batch, key/value head); thread m owns value column m and serves the
// G query heads that share this key/value head. The token's own weight (q.k)^p is computed
// directly, as the MLX path does, so the first token gives y = v exactly.
// Template: DEG (1 or 2), DIM (head width d), E (value width), G (query heads per kv head),
// FEATURES (D), NORMALIZE (bool).
// Inputs (contiguous): q (B, H*G, d), k (B, H, d), v (B, H, e), decay (B, H) = exp(log_g),
// S (B, H, D, e), z (B, H, D). Outputs: y (B, H*G, e), S_out, z_out shaped like S and z.
uint m = thread_position_in_threadgroup.x;
uint bh = threadgroup_position_in_grid.x;
if (m >= E) {
    return;  // no barriers below: extra threads may leave
}
const device float* kh = k + bh * DIM;
float g = decay[bh];
float v_m = v[bh * E + m];
float own[G];
float num[G];
float den[G];
for (int h = 0; h < G; ++h) {
    const device float* qh = q + (bh * G + h) * DIM;
    float dot = 0.0f;
    for (int i = 0; i < DIM; ++i) {
        dot += qh[i] * kh[i];
    }
    own[h] = DEG == 2 ? dot * dot : dot;
    num[h] = 0.0f;
    den[h] = 0.0f;
}
for (int p = 0; p < FEATURES; ++p) {
    int i = p;
    int j = p;
    float w = 1.0f;
    if (DEG == 2) {
        sym2_feature(p, DIM, i, j, w);
    }
    float phi_k = DEG == 2 ? w * kh[i] * kh[j] : kh[i];
    float s_decayed = g * S[(bh * FEATURES + p) * E + m];
    float z_decayed = g * z[bh * FEATURES + p];
    for (int h = 0; h < G; ++h) {
        const device float* qh = q + (bh * G + h) * DIM;
        float phi_q = DEG == 2 ? w * qh[i] * qh[j] : qh[i];
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
    y[(bh * G + h) * E + m] = NORMALIZE ? n / (d == 0.0f ? 1.0f : d) : n;
}
