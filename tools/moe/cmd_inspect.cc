// moe inspect: architecture, hyper-parameters, router, tensor table, bytes per expert and per
// token. Training-only routers (expert_choice) are shown too; moe run refuses them.
#include <array>
#include <cstdio>
#include <map>
#include <memory>
#include <optional>
#include <string>

#include <nlohmann/json.hpp>

#include "commands.h"
#include "formats/gguf.h"
#include "model/imatrix.h"
#include "model/model.h"
#include "moe/moe_layer.h"
#include "util/error.h"

namespace moe::cli {

Runner AddInspect(CLI::App& app) {
  auto path = std::make_shared<std::string>();
  auto json = std::make_shared<bool>(false);
  app.add_option("model", *path, "GGUF model file")->required();
  app.add_flag("--json", *json, "print one JSON object");
  return [=]() {
    // An importance matrix (llama.cpp's imatrix GGUF) rather than a model.
    if (GgufFile::Open(*path)->GetStringOpt("general.type") == std::optional<std::string>("imatrix")) {
      const Imatrix m = Imatrix::Load(*path);
      nlohmann::json j;
      j["imatrix"] = {{"entries", m.entries().size()}, {"chunk_count", m.chunk_count},
                      {"chunk_size", m.chunk_size}, {"datasets", m.datasets}};
      if (*json) {
        std::printf("%s\n", j.dump().c_str());
        return 0;
      }
      std::printf("%s: importance matrix of %zu weight matrices from %u chunks of %u tokens\n", path->c_str(),
                  m.entries().size(), m.chunk_count, m.chunk_size);
      for (const std::string& d : m.datasets) std::printf("  dataset %s\n", d.c_str());
      return 0;
    }
    auto model = Model::Load(*path, /*allow_training_only=*/true);
    const ModelConfig& c = model->config();
    const GgufFile& f = model->file();
    nlohmann::json j;
    j["architecture"] = c.arch_name;
    j["file_size"] = f.file_size();
    j["hparams"] = {
        {"n_layer", c.n_layer}, {"n_embd", c.n_embd}, {"n_head", c.n_head},
        {"n_head_kv", c.n_head_kv}, {"head_dim", c.n_embd_head_k}, {"n_rot", c.n_rot},
        {"n_ctx_train", c.n_ctx_train}, {"n_vocab", c.n_vocab}, {"n_expert", c.n_expert},
        {"n_expert_used", c.n_expert_used}, {"n_ff_exp", c.n_ff_exp},
        {"n_ff_shexp", c.n_ff_shexp}, {"rms_eps", c.rms_eps},
        {"rope_freq_base", c.rope_freq_base},
        {"rope_type", c.rope_type == RopeType::kNeox ? "neox" : "normal"},
        {"norm_topk", c.moe.norm_topk}};
    if (c.rope_scaling != RopeScalingType::kNone) {
      j["hparams"]["rope_scaling"] = c.rope_scaling == RopeScalingType::kYarn ? "yarn" : "linear";
      j["hparams"]["rope_scaling_factor"] = c.rope_scaling_factor;
      if (c.n_ctx_orig_yarn) j["hparams"]["rope_orig_ctx"] = c.n_ctx_orig_yarn;
    }
    if (c.is_mla()) {  // deepseek2: head_dim is qk_nope + qk_rope, n_rot is qk_rope
      j["hparams"]["kv_lora_rank"] = c.n_lora_kv;
      j["hparams"]["q_lora_rank"] = c.n_lora_q;
      j["hparams"]["qk_nope"] = c.qk_nope();
      j["hparams"]["v_head_dim"] = c.n_embd_head_v;
      j["hparams"]["mla_layout"] = c.mla_kv_b_legacy ? "attn_kv_b (legacy)" : "attn_k_b + attn_v_b";
      j["hparams"]["leading_dense"] = c.n_layer_dense_lead;
      if (c.n_layer_dense_lead > 0) j["hparams"]["n_ff_dense"] = c.n_ff;
    }
    nlohmann::json router = {{"name", MoeRouterName(c.router_kind)},
                             {"gating", c.router_kind == MoeRouterKind::kSigmoidBias ? "sigmoid" : "softmax"},
                             {"norm_topk", c.moe.norm_topk},
                             {"weights_scale", c.expert_weights_scale},
                             {"n_targets", c.n_router()},
                             {"servable", UnservableRouterReason(c).empty()},
                             {"llama_cpp_difference", LlamaCppDifference(c)}};
    if (c.router_kind == MoeRouterKind::kTopP) router["top_p"] = c.router_top_p;
    if (c.router_kind == MoeRouterKind::kHash) router["hash_seed"] = c.router_hash_seed;
    if (c.n_expert_groups > 1) router["groups"] = {c.n_expert_groups, c.n_group_used};
    if (c.n_expert_shared > 0) router["n_expert_shared"] = c.n_expert_shared;
    if (c.n_expert_null > 0) router["n_null"] = c.n_expert_null;
    if (c.n_expert_zero + c.n_expert_copy + c.n_expert_const > 0)
      router["zero_computation"] = {{"zero", c.n_expert_zero}, {"copy", c.n_expert_copy}, {"const", c.n_expert_const}};
    if (c.expert_gating_residual) router["gating_residual"] = true;
    j["router"] = router;
    j["tokenizer"] = model->tokenizer().model();
    j["bytes_per_expert"] = model->BytesPerExpert();
    j["bytes_per_token"] = model->BytesPerToken();
    j["macs_per_token"] = model->MacsPerToken();
    j["kv_bytes_per_token"] = c.KvBytesPerPosition();  // f32 cache (the default)
    j["kv_bytes_per_token_f16"] = c.KvBytesPerPosition(2);
    uint64_t total = 0;
    nlohmann::json tensors = nlohmann::json::array();
    for (const GgufTensorInfo& t : f.tensors()) {
      std::vector<int64_t> ne(t.view.ne, t.view.ne + t.view.n_dims);
      tensors.push_back({{"name", t.view.name}, {"type", DTypeName(t.view.dtype)}, {"shape", ne},
                         {"bytes", t.view.NumBytes()}, {"offset", f.data_section_offset() + t.data_offset}});
      total += t.view.NumBytes();
    }
    j["tensor_bytes"] = total;
    j["tensors"] = tensors;
    // The weight-type mix: tensors, bytes and elements per type, and bits per weight overall.
    std::map<std::string, std::array<uint64_t, 3>> mix;
    uint64_t n_params = 0;
    for (const GgufTensorInfo& t : f.tensors()) {
      auto& m = mix[DTypeName(t.view.dtype)];
      m[0] += 1;
      m[1] += t.view.NumBytes();
      m[2] += static_cast<uint64_t>(t.view.NumElements());
      n_params += static_cast<uint64_t>(t.view.NumElements());
    }
    nlohmann::json types = nlohmann::json::object();
    for (const auto& [name, m] : mix) types[name] = {{"tensors", m[0]}, {"bytes", m[1]}, {"params", m[2]}};
    j["types"] = types;
    j["n_params"] = n_params;
    j["bits_per_weight"] = n_params ? 8.0 * static_cast<double>(total) / static_cast<double>(n_params) : 0.0;
    if (const auto ft = f.GetU32Opt("general.file_type")) j["file_type"] = *ft;
    if (const auto im = f.GetStringOpt("quantize.imatrix.file")) {  // quantized with an importance matrix
      const GgufValue* chunks = f.Find("quantize.imatrix.chunks_count");
      j["imatrix"] = {{"file", *im}, {"chunks", chunks ? chunks->num.i64 : 0}};
    }
    if (*json) {
      std::printf("%s\n", j.dump().c_str());
      return 0;
    }
    std::printf("%s: %s, %.2f MiB\n", path->c_str(), c.arch_name.c_str(), f.file_size() / 1048576.0);
    for (auto& [k, v] : j["hparams"].items()) {
      if (v.is_number_float())
        std::printf("  %-16s %g\n", k.c_str(), v.get<double>());
      else
        std::printf("  %-16s %s\n", k.c_str(), v.is_string() ? v.get<std::string>().c_str() : v.dump().c_str());
    }
    std::string rline = MoeRouterName(c.router_kind);
    if (c.router_kind == MoeRouterKind::kTopP) rline += StrFormat(" (top_p %g)", c.router_top_p);
    if (c.router_kind == MoeRouterKind::kHash)
      rline += StrFormat(" (hash_seed %llu)", static_cast<unsigned long long>(c.router_hash_seed));
    if (c.n_expert_groups > 1) rline += StrFormat(", %u groups (%u used)", c.n_expert_groups, c.n_group_used);
    if (c.expert_weights_scale != 1.0f) rline += StrFormat(", weights x %g", c.expert_weights_scale);
    if (c.n_expert_shared > 0) rline += StrFormat(", %u shared experts", c.n_expert_shared);
    if (c.n_expert_null > 0) rline += StrFormat(", %u null experts", c.n_expert_null);
    if (c.n_expert_zero + c.n_expert_copy + c.n_expert_const > 0)
      rline += StrFormat(", zero/copy/const experts %u/%u/%u", c.n_expert_zero, c.n_expert_copy, c.n_expert_const);
    if (c.expert_gating_residual) rline += ", gating residuals";
    if (!UnservableRouterReason(c).empty()) rline += " (training-only: moe run refuses it)";
    std::printf("  %-16s %s\n", "router", rline.c_str());
    const std::string diff = LlamaCppDifference(c);
    std::printf("  %-16s %s\n", "llama.cpp", diff.empty() ? "computes the same model" : ("differs: " + diff).c_str());
    std::printf("  %-16s %s\n", "tokenizer", model->tokenizer().model().c_str());
    std::printf("  %-16s %.3f MiB\n", "bytes/expert", model->BytesPerExpert() / 1048576.0);
    std::printf("  %-16s %.3f MiB (weights read per generated token)\n", "bytes/token",
                model->BytesPerToken() / 1048576.0);
    std::printf("  %-16s %llu (f16 cache, the default, all layers; %llu with --cache-type f32%s)\n", "KV bytes/token",
                static_cast<unsigned long long>(c.KvBytesPerPosition(2)),
                static_cast<unsigned long long>(c.KvBytesPerPosition()),
                c.is_mla() ? "; MLA caches the latent, not per-head K and V" : "");
    std::string tline;
    for (const auto& [name, m] : mix)
      tline += StrFormat("%s%s x%llu (%.2f MiB)", tline.empty() ? "" : ", ", name.c_str(),
                         static_cast<unsigned long long>(m[0]), m[1] / 1048576.0);
    std::printf("  %-16s %s\n", "weight types", tline.c_str());
    std::printf("  %-16s %.3f bits per weight over %.2f M parameters\n", "size",
                j["bits_per_weight"].get<double>(), n_params / 1e6);
    if (j.contains("imatrix"))
      std::printf("  %-16s %s (%lld chunks)\n", "imatrix", j["imatrix"]["file"].get<std::string>().c_str(),
                  static_cast<long long>(j["imatrix"]["chunks"].get<int64_t>()));
    std::printf("\n%-36s %-6s %-22s %12s\n", "tensor", "type", "shape", "bytes");
    for (const GgufTensorInfo& t : f.tensors())
      std::printf("%-36s %-6s %-22s %12zu\n", t.view.name.c_str(), DTypeName(t.view.dtype),
                  ShapeString(t.view.ne, t.view.n_dims).c_str(), t.view.NumBytes());
    return 0;
  };
}

}  // namespace moe::cli
