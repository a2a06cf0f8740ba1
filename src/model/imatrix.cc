#include "model/imatrix.h"

#include <algorithm>
#include <cmath>
#include <memory>

#include "formats/gguf.h"
#include "model/forward.h"
#include "model/model.h"
#include "util/error.h"
#include "util/threadpool.h"

namespace moe {
namespace {

constexpr const char* kSums = ".in_sum2";
constexpr const char* kCounts = ".counts";

bool StripSuffix(std::string* s, const char* suffix) {
  const size_t n = std::char_traits<char>::length(suffix);
  if (s->size() <= n || s->compare(s->size() - n, n, suffix) != 0) return false;
  s->resize(s->size() - n);
  return true;
}

}  // namespace

Imatrix Imatrix::Load(const std::string& path) {
  const std::unique_ptr<GgufFile> f = GgufFile::Open(path);
  Imatrix m;
  if (f->Has("imatrix.datasets")) m.datasets = f->GetStringArray("imatrix.datasets");
  m.chunk_count = f->GetU32Opt("imatrix.chunk_count").value_or(0);
  m.chunk_size = f->GetU32Opt("imatrix.chunk_size").value_or(0);
  std::map<std::string, std::pair<const TensorView*, const TensorView*>> parts;
  for (const GgufTensorInfo& ti : f->tensors()) {
    std::string name = ti.view.name;
    if (StripSuffix(&name, kSums)) {
      parts[name].first = &ti.view;
    } else if (StripSuffix(&name, kCounts)) {
      parts[name].second = &ti.view;
    }
  }
  if (parts.empty()) Fail("%s: not an importance matrix (no '<weight>.in_sum2' tensors)", path.c_str());
  for (const auto& [name, sc] : parts) {
    const TensorView* sums = sc.first;
    const TensorView* counts = sc.second;
    if (sums == nullptr || counts == nullptr)
      Fail("%s: '%s' has %s but no %s", path.c_str(), name.c_str(), sums ? kSums : kCounts, sums ? kCounts : kSums);
    if (sums->dtype != DType::kF32 || counts->dtype != DType::kF32)
      Fail("%s: the sums and counts of '%s' must be f32", path.c_str(), name.c_str());
    const int64_t n_mat = counts->NumElements();
    if (n_mat < 1 || sums->ne[0] < 1 || sums->NumElements() != sums->ne[0] * n_mat)
      Fail("%s: '%s' has %lld sums of rows of %lld for %lld matrices", path.c_str(), name.c_str(),
           static_cast<long long>(sums->NumElements()), static_cast<long long>(sums->ne[0]),
           static_cast<long long>(n_mat));
    Entry e;
    e.ne0 = sums->ne[0];
    e.sum2.assign(sums->F32(), sums->F32() + sums->NumElements());
    e.counts.assign(counts->F32(), counts->F32() + n_mat);
    const auto finite_nonneg = [](float v) { return std::isfinite(v) && v >= 0; };
    if (!std::all_of(e.sum2.begin(), e.sum2.end(), finite_nonneg) ||
        !std::all_of(e.counts.begin(), e.counts.end(), finite_nonneg))
      Fail("%s: '%s' has a negative or non-finite value", path.c_str(), name.c_str());
    m.entries_.emplace(name, std::move(e));
  }
  return m;
}

void Imatrix::Save(const std::string& path) const {
  GgufWriter w;
  w.SetString("general.type", "imatrix");
  w.SetStringArray("imatrix.datasets", datasets);
  w.SetU32("imatrix.chunk_count", chunk_count);
  w.SetU32("imatrix.chunk_size", chunk_size);
  for (const auto& [name, e] : entries_) {
    const int64_t n_mat = static_cast<int64_t>(e.counts.size());
    w.AddTensor(name + kSums, DType::kF32, {e.ne0, n_mat}, e.sum2.data(), e.sum2.size() * sizeof(float));
    w.AddTensor(name + kCounts, DType::kF32, {1, n_mat}, e.counts.data(), e.counts.size() * sizeof(float));
  }
  w.Write(path);
}

void Imatrix::Add(const std::string& name, int mat, int n_mat, int64_t ne0, const float* const* rows,
                  int n) {
  Entry& e = entries_[name];
  if (e.counts.empty()) {
    e.ne0 = ne0;
    e.sum2.assign(static_cast<size_t>(ne0 * n_mat), 0.0f);
    e.counts.assign(static_cast<size_t>(n_mat), 0.0f);
  }
  MOE_ASSERT(e.ne0 == ne0 && static_cast<int>(e.counts.size()) == n_mat && mat >= 0 && mat < n_mat);
  float* s = e.sum2.data() + static_cast<size_t>(mat) * ne0;
  for (int r = 0; r < n; ++r) {
    const float* x = rows[r];
    for (int64_t j = 0; j < ne0; ++j) s[j] += x[j] * x[j];
  }
  e.counts[mat] += static_cast<float>(n);
}

std::vector<float> Imatrix::Values(const std::string& name, int mat, int n_mat, int64_t ne0) const {
  const auto it = entries_.find(name);
  if (it == entries_.end()) return {};
  const Entry& e = it->second;
  if (e.ne0 != ne0 || static_cast<int64_t>(e.counts.size()) != n_mat)
    Fail("the importance matrix of '%s' is for %zu matrices of %lld columns, the tensor has %d of %lld",
         name.c_str(), e.counts.size(), static_cast<long long>(e.ne0), n_mat, static_cast<long long>(ne0));
  const float count = e.counts[static_cast<size_t>(mat)];
  std::vector<float> v(static_cast<size_t>(ne0), 1.0f);
  if (count > 0) {
    const float* s = e.sum2.data() + static_cast<size_t>(mat) * ne0;
    for (int64_t j = 0; j < ne0; ++j) v[static_cast<size_t>(j)] = s[j] / count;
  }
  return v;
}

Imatrix GatherImatrix(const Model& model, const std::vector<int32_t>& tokens, int chunk, int threads,
                      const std::function<void(int, int)>& progress) {
  const ModelConfig& c = model.config();
  if (chunk < 2) Fail("the importance-matrix chunk must be at least 2 tokens (got %d)", chunk);
  if (c.n_ctx_train > 0 && static_cast<uint32_t>(chunk) > c.n_ctx_train) chunk = static_cast<int>(c.n_ctx_train);
  const int n_chunks = static_cast<int>(tokens.size() / static_cast<size_t>(chunk));
  if (n_chunks == 0)
    Fail("the importance-matrix data has %zu tokens, fewer than one chunk of %d", tokens.size(), chunk);
  Imatrix m;
  m.chunk_size = static_cast<uint32_t>(chunk);
  ThreadPool pool(threads);
  Forward fwd(model, pool, chunk, std::min(chunk, 512));
  fwd.SetInputObserver([&m](const TensorView& w, int expert, const float* const* rows, int n) {
    if (w.name == "output.weight") return;  // as llama-imatrix (without --process-output)
    m.Add(w.name, expert, static_cast<int>(w.ne[2]), w.ne[0], rows, n);
  });
  const Tokenizer& tok = model.tokenizer();
  std::vector<int32_t> ids(static_cast<size_t>(chunk));
  std::vector<float> logits;
  for (int ci = 0; ci < n_chunks; ++ci) {
    std::copy_n(tokens.begin() + static_cast<int64_t>(ci) * chunk, chunk, ids.begin());
    if (tok.add_bos() && tok.bos() >= 0) ids[0] = tok.bos();
    fwd.Reset();
    fwd.Eval(ids.data(), chunk, /*all_logits=*/false, &logits);
    m.chunk_count = static_cast<uint32_t>(ci + 1);
    if (progress) progress(ci + 1, n_chunks);
  }
  return m;
}

}  // namespace moe
