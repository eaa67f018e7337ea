// The degree-2 symmetric power feature p of a d-vector, in the order of
// power_retention.sympow: the d squares, then for r = 1 .. (d - 1) / 2 the products
// x_i x_{(i + r) mod d} (i = 0 .. d - 1), then for even d the products x_i x_{i + d/2}
// (i < d / 2); every product of two different indices is weighted by sqrt(2).
inline void sym2_feature(int p, int d, thread int& i, thread int& j, thread float& w) {
    if (p < d) {
        i = p;
        j = p;
        w = 1.0f;
        return;
    }
    int rest = p - d;
    int shifts = (d - 1) / 2;
    if (rest < shifts * d) {
        i = rest % d;
        j = (i + rest / d + 1) % d;
    } else {
        i = rest - shifts * d;
        j = i + d / 2;
    }
    w = 1.41421356237309515f;
}
