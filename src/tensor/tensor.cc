#include "tensor/tensor.h"

namespace moe {

std::string ShapeString(const int64_t* ne, int n_dims) {
  std::string s = "{";
  for (int i = 0; i < n_dims; ++i) {
    if (i) s += ", ";
    s += std::to_string(ne[i]);
  }
  return s + "}";
}

}  // namespace moe
