// What every primitive of power_retention.native does to run: allocate its outputs and queue
// its work on the stream's CPU worker, as MLX's own CPU ops do.
#pragma once

#include <stdexcept>
#include <utility>
#include <vector>

#include "mlx/allocator.h"
#include "mlx/array.h"
#include "mlx/backend/cpu/encoder.h"

namespace power_retention_native {

namespace mx = mlx::core;

// Queues work(inputs, outputs), on views that do not keep the arrays alive (the encoder does).
template <typename Work>
void run_on_cpu(mx::Stream stream, const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs,
                Work work) {
  auto& encoder = mx::cpu::get_command_encoder(stream);
  std::vector<mx::array> in, out;
  for (const auto& x : inputs) {
    encoder.set_input_array(x);
    in.push_back(mx::array::unsafe_weak_copy(x));
  }
  for (auto& y : outputs) {
    y.set_data(mx::allocator::malloc(y.nbytes()));
    encoder.set_output_array(y);
    out.push_back(mx::array::unsafe_weak_copy(y));
  }
  encoder.dispatch([work = std::move(work), in = std::move(in), out = std::move(out)]() mutable { work(in, out); });
}

[[noreturn]] inline void no_gpu() { throw std::runtime_error("power_retention.native runs on the CPU only"); }

}  // namespace power_retention_native
