// Symmetric power features of a DIM-vector, visited in the order of power_retention.sympow,
// one at a time, so that a kernel never stores the D = C(DIM + DEG - 1, DEG) features:
//   DEG 1: x_i.
//   DEG 2: the squares x_i^2, then for r = 1 .. (DIM - 1) / 2 the products x_i x_{(i + r) mod DIM}
//          (i = 0 .. DIM - 1), then for even DIM the products x_i x_{i + DIM/2} (i < DIM / 2);
//          products of two different entries weighted by sqrt(2).
//   DEG >= 3: the multisets i_1 <= ... <= i_DEG in lexicographic order, weighted by
//          sqrt(DEG! / prod(m!)) with m the repeat counts.
// Usage: FeatureCursor<DEG, DIM> f; (feature 0) ... f.advance(); (feature 1) ...
// or f.seek(p) to jump to feature p. f.value(x) reads x (any indexable: device, threadgroup
// or thread memory) at the feature's indices.
template <int DEG, int DIM>
struct FeatureCursor {
    int index[DEG];
    int shift;  // DEG 2: r, the distance between the two indices (0 for the squares)
    float weight;

    FeatureCursor() {
        for (int t = 0; t < DEG; ++t) {
            index[t] = 0;
        }
        shift = 0;
        weight = 1.0f;
    }

    // Multisets of size k drawn from n values: C(n + k - 1, k).
    static int multisets(int n, int k) {
        int count = 1;
        for (int u = 1; u <= k; ++u) {
            count = count * (n + u - 1) / u;  // exact: a running binomial coefficient
        }
        return count;
    }

    void seek(int p) {
        if (DEG == 1) {
            index[0] = p;
            return;
        }
        if (DEG == 2) {
            shift = p < DIM ? 0 : 1 + (p - DIM) / DIM;
            index[0] = p - DIM * shift;  // row r starts at feature DIM * r
            index[1] = (index[0] + shift) % DIM;
            weight = shift == 0 ? 1.0f : 1.41421356237309515f;
            return;
        }
        // Unrank in lexicographic order: at each position take the smallest value a whose
        // block of completions (multisets of the remaining size from values >= a) holds p.
        int low = 0;
        for (int t = 0; t < DEG; ++t) {
            int a = low;
            int block = multisets(DIM - a, DEG - t - 1);
            while (p >= block) {
                p -= block;
                a += 1;
                block = multisets(DIM - a, DEG - t - 1);
            }
            index[t] = a;
            low = a;
        }
        set_weight();
    }

    void advance() {
        if (DEG == 1) {
            index[0] += 1;
        } else if (DEG == 2) {
            int row_length = 2 * shift == DIM ? DIM / 2 : DIM;
            index[0] += 1;
            if (index[0] == row_length) {
                index[0] = 0;
                shift += 1;
            }
            index[1] = (index[0] + shift) % DIM;
            weight = shift == 0 ? 1.0f : 1.41421356237309515f;
        } else {
            int t = DEG - 1;
            while (t > 0 && index[t] == DIM - 1) {
                --t;
            }
            index[t] += 1;
            for (int u = t + 1; u < DEG; ++u) {
                index[u] = index[t];
            }
            set_weight();
        }
    }

    void set_weight() {
        float factorial_product = 1.0f;
        float run = 1.0f;
        for (int u = 1; u < DEG; ++u) {
            run = index[u] == index[u - 1] ? run + 1.0f : 1.0f;
            factorial_product *= run;
        }
        float factorial = 1.0f;
        for (int u = 2; u <= DEG; ++u) {
            factorial *= float(u);
        }
        weight = metal::sqrt(factorial / factorial_product);
    }

    template <typename X>
    float value(X x) const {
        float product = weight;
        for (int t = 0; t < DEG; ++t) {
            product *= float(x[index[t]]);
        }
        return product;
    }
};
