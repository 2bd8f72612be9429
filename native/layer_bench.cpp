// fastfeat-layer-bench: per-layer timing of a network's forward pass through libfastfeat_kernels, with
// no Python in the loop. It runs the same fused plan as `fastfeat profile --backends triton`
// (TritonNet.plan([last layer]), recorded into ff_networks.inc at build time) on random data, times
// every op with CUDA events (median and 20th/80th percentiles of --repeat runs after --warmup runs,
// each op on the output of the one before) and the whole forward back to back, and prints the same
// per-layer table and JSON schema as `fastfeat profile` (backend "native").
//
//   fastfeat-layer-bench --model caffenet --batch-sizes 1,64 --precision bf16 --json out.json
//
// --splitk-reduce picks how fc layers that split K sum their partials: separate (default: a second
// launch), fused (in the GEMM launch; each (op, batch) gets its own workspace, zeroed once, as the header's
// contract asks), or both: the table is the separate form's, and every fc op that splits K is also timed
// fused, right after, on the same input, and the two outputs compared byte for byte (they must be
// identical: same partials, summed in the same order). The JSON then lists those pairs under "splitk".
//
// Exit status: 0 done, 1 a kernel or CUDA call failed or the two split-K reduces' outputs differ, 2 no
// usable GPU here (no CUDA driver, no device, wrong architecture), 64 bad command line.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <map>
#include <memory>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "cuda_shim.h"
#include "fastfeat_kernels.h"

namespace {

enum OpFamily { FF_OP_CONV, FF_OP_POOL, FF_OP_LRN, FF_OP_FC };
struct LayerDesc {
  const char *name, *kind, *shape;
  long long macs;  // per image
};
struct LrnDesc {
  int size;
  double alpha, beta, k;
};
struct OpDesc {
  const char *name, *kind;
  int family;
  const char *covers[4];
  int n_covers;
  int in[3];
  int in_rank;
  int out[3];
  int out_rank;
  int p[12];  // conv: out, groups, kernel, stride, pad, relu, has_bias; fc: out, relu, has_bias;
              // pool: kernel, stride, pad, ceil, relu, fuse_lrn
  LrnDesc lrn;
};
struct NetDesc {
  const char *name;
  int input_size;
  std::vector<LayerDesc> layers;
  std::vector<OpDesc> ops;
};
#include "ff_networks.inc"

const char *kTypeOrder[] = {"conv", "fc", "pool", "norm", "relu"};
constexpr int kExitFailed = 1, kExitNoGpu = 2, kExitUsage = 64;

struct Options {
  std::string model = "caffenet", precision = "bf16", json, splitk_reduce = "separate";
  std::vector<int> batches = {1, 64};
  int repeat = 10, warmup = 2, device = 0;
};

[[noreturn]] void usage(const std::string &why) {
  std::fprintf(stderr,
               "fastfeat-layer-bench: %s\n"
               "usage: fastfeat-layer-bench [--model NAME] [--batch-sizes 1,64] [--precision bf16|fp16|fp32]\n"
               "                            [--repeat N] [--warmup N] [--device ORDINAL] [--json PATH]\n"
               "                            [--splitk-reduce separate|fused|both]\n",
               why.c_str());
  std::exit(kExitUsage);
}

int parse_int(const std::string &text, const char *what, int minimum) {
  char *end = nullptr;
  long v = std::strtol(text.c_str(), &end, 10);
  if (text.empty() || *end != '\0' || v < minimum || v > 1 << 24)
    usage(std::string(what) + " must be an integer >= " + std::to_string(minimum) + ", got '" + text + "'");
  return static_cast<int>(v);
}

Options parse(int argc, char **argv) {
  Options o;
  for (int i = 1; i < argc; i++) {
    std::string a = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) usage(a + " needs a value");
      return argv[++i];
    };
    if (a == "--model") o.model = value();
    else if (a == "--precision") o.precision = value();
    else if (a == "--json") o.json = value();
    else if (a == "--splitk-reduce") o.splitk_reduce = value();
    else if (a == "--repeat") o.repeat = parse_int(value(), "--repeat", 1);
    else if (a == "--warmup") o.warmup = parse_int(value(), "--warmup", 0);
    else if (a == "--device") o.device = parse_int(value(), "--device", 0);
    else if (a == "--batch-sizes") {
      o.batches.clear();
      std::stringstream ss(value());
      for (std::string part; std::getline(ss, part, ',');) {
        int b = parse_int(part, "each batch size", 1);
        if (std::find(o.batches.begin(), o.batches.end(), b) == o.batches.end()) o.batches.push_back(b);
      }
    } else if (a == "-h" || a == "--help") {
      std::printf("fastfeat-layer-bench: per-layer timing of a network through libfastfeat_kernels (see the source)\n");
      std::exit(0);
    } else
      usage("unknown argument '" + a + "'");
  }
  if (o.precision != "bf16" && o.precision != "fp16" && o.precision != "fp32")
    usage("--precision must be bf16, fp16 or fp32, got '" + o.precision + "'");
  if (o.splitk_reduce != "separate" && o.splitk_reduce != "fused" && o.splitk_reduce != "both")
    usage("--splitk-reduce must be separate, fused or both, got '" + o.splitk_reduce + "'");
  return o;
}

const NetDesc *find_net(const std::string &name) {
  for (const auto &n : kNetworks)
    if (name == n.name) return &n;
  return nullptr;
}

// -- device memory ----------------------------------------------------------------------------
struct Failure {
  std::string what;
  int exit_code;
};

void check_cu(CUresult r, const char *what) {
  if (r == CUDA_SUCCESS) return;
  const char *name = "unknown";
  cuGetErrorName(r, &name);
  throw Failure{std::string(what) + " failed: " + name, kExitFailed};
}

void check_ff(int status, const std::string &what) {
  if (status == FASTFEAT_OK) return;
  std::string msg = what + ": " + fastfeat_status_string(status);
  if (status == FASTFEAT_ERR_LAUNCH) msg += " (CUDA error " + std::to_string(fastfeat_last_cuda_error()) + ")";
  bool no_gpu = status == FASTFEAT_ERR_NO_DRIVER || status == FASTFEAT_ERR_NO_DEVICE || status == FASTFEAT_ERR_WRONG_ARCH;
  throw Failure{msg, no_gpu ? kExitNoGpu : kExitFailed};
}

struct Buffer {
  CUdeviceptr ptr = 0;
  size_t bytes = 0;
  Buffer() = default;
  explicit Buffer(size_t n) : bytes(n) { check_cu(cuMemAlloc(&ptr, n ? n : 16), "cuMemAlloc"); }
  Buffer(const Buffer &) = delete;
  Buffer &operator=(const Buffer &) = delete;
  Buffer(Buffer &&o) noexcept : ptr(o.ptr), bytes(o.bytes) { o.ptr = 0; }
  Buffer &operator=(Buffer &&o) noexcept {
    if (this != &o) {
      if (ptr) cuMemFree(ptr);
      ptr = o.ptr, bytes = o.bytes, o.ptr = 0;
    }
    return *this;
  }
  ~Buffer() {
    if (ptr) cuMemFree(ptr);
  }
  void *get() const { return reinterpret_cast<void *>(static_cast<uintptr_t>(ptr)); }
};

uint16_t to_half_bits(float f, bool bf16) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if (bf16) return static_cast<uint16_t>((u + 0x7FFF + ((u >> 16) & 1)) >> 16);  // round to nearest even
  // fp16: the values here are small and normal, so a plain rounding conversion suffices.
  uint32_t sign = (u >> 16) & 0x8000;
  int exp = static_cast<int>((u >> 23) & 0xFF) - 127 + 15;
  uint32_t mant = u & 0x7FFFFF;
  if (exp <= 0) return static_cast<uint16_t>(sign);
  if (exp >= 31) return static_cast<uint16_t>(sign | 0x7C00);
  uint32_t h = sign | (static_cast<uint32_t>(exp) << 10) | (mant >> 13);
  if ((mant & 0x1FFF) > 0x1000 || ((mant & 0x1FFF) == 0x1000 && (h & 1))) h++;
  return static_cast<uint16_t>(h);
}

// A device buffer of `count` N(0, scale^2) values of the precision (fp32 for biases).
Buffer random_buffer(size_t count, const std::string &precision, float scale, std::mt19937 &rng) {
  std::normal_distribution<float> normal(0.0f, scale);
  size_t elem = precision == "fp32" ? 4 : 2;
  std::vector<unsigned char> host(count * elem);
  for (size_t i = 0; i < count; i++) {
    float v = normal(rng);
    if (elem == 4)
      std::memcpy(&host[i * 4], &v, 4);
    else {
      uint16_t h = to_half_bits(v, precision == "bf16");
      std::memcpy(&host[i * 2], &h, 2);
    }
  }
  Buffer b(host.size());
  check_cu(cuMemcpyHtoD(b.ptr, host.data(), host.size()), "cuMemcpyHtoD");
  return b;
}

long long prod(const int *d, int rank) {
  long long p = 1;
  for (int i = 0; i < rank; i++) p *= d[i];
  return p;
}

// -- the network's ops as library calls ---------------------------------------------------------
struct BoundOp {
  const OpDesc *op;
  Buffer weight, bias, workspace;  // workspace: the separate reduce's, for the largest batch
  int w_row_stride = 0;
  std::map<int, Buffer> fused_workspace;  // the fused reduce's, per batch: its counters' layout follows m
};

int dtype_of(const std::string &p) { return p == "fp32" ? FASTFEAT_FP32 : p == "fp16" ? FASTFEAT_FP16 : FASTFEAT_BF16; }

fastfeat_gemm_desc fc_desc(const OpDesc &o, int n, int w_row_stride, int reduce) {
  int k = static_cast<int>(prod(o.in, o.in_rank));
  return fastfeat_gemm_desc{n, o.p[0], k, w_row_stride, w_row_stride, o.p[1], 1, 0, reduce};
}

// Runs one op at batch n from x to y (fc: with split-K reduce `reduce`). Shapes are per image:
// conv-side (C, H, W), fc (F,).
int run_op(const BoundOp &b, int dtype, int n, const void *x, void *y, CUstream stream,
           int reduce = FASTFEAT_SPLITK_SEPARATE) {
  const OpDesc &o = *b.op;
  switch (o.family) {
    case FF_OP_CONV: {
      fastfeat_conv_desc d{n, o.in[1], o.in[2], o.in[0], o.p[0], o.p[1], o.p[2], o.p[2], o.p[3], o.p[3], o.p[4], o.p[4],
                           o.p[5], 1, 0};
      return fastfeat_conv2d_bias_relu(stream, dtype, &d, x, b.weight.get(), b.bias.get(), y);
    }
    case FF_OP_POOL: {
      fastfeat_pool_desc d{n, o.in[1], o.in[2], o.in[0], o.p[0], o.p[0], o.p[1], o.p[1], o.p[2], o.p[2], o.p[3], o.p[4],
                           o.p[5], {o.lrn.size, o.lrn.alpha, o.lrn.beta, o.lrn.k}};
      return fastfeat_maxpool_relu_lrn(stream, dtype, &d, x, y);
    }
    case FF_OP_LRN: {
      fastfeat_lrn_desc d{n, o.in[1], o.in[2], o.in[0], {o.lrn.size, o.lrn.alpha, o.lrn.beta, o.lrn.k}};
      return fastfeat_lrn(stream, dtype, &d, x, y);
    }
    default: {
      fastfeat_gemm_desc d = fc_desc(o, n, b.w_row_stride, reduce);
      const Buffer *ws = &b.workspace;
      if (reduce == FASTFEAT_SPLITK_FUSED) {
        auto it = b.fused_workspace.find(n);
        if (it == b.fused_workspace.end()) return FASTFEAT_ERR_WORKSPACE;
        ws = &it->second;
      }
      return fastfeat_gemm_bias_relu(stream, dtype, &d, x, b.weight.get(), b.bias.get(), y, ws->get(), ws->bytes);
    }
  }
}

// numpy.percentile's default (linear interpolation), as fastfeat.profile uses it.
double percentile(std::vector<double> v, double q) {
  std::sort(v.begin(), v.end());
  double pos = q / 100.0 * (v.size() - 1);
  size_t lo = static_cast<size_t>(std::floor(pos)), hi = std::min(lo + 1, v.size() - 1);
  return v[lo] + (v[hi] - v[lo]) * (pos - lo);
}

// -- JSON and the table ------------------------------------------------------------------------------
std::string jstr(const std::string &s) {
  std::string out = "\"";
  for (char c : s) {
    if (c == '"' || c == '\\') out += '\\';
    out += c;
  }
  return out + "\"";
}
std::string jnum(double v) {
  if (!std::isfinite(v)) return "null";
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.17g", v);
  return buf;
}
std::string fixed(double v, int digits) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.*f", digits, v);
  return buf;
}

struct LayerRecord {
  std::string name, type;
  std::vector<std::string> covers;
  long long macs;
  double median, p20, p80, percent, ms_per_image, gflops;  // gflops NaN = null
  std::vector<int> shape;
};
// --splitk-reduce both: one fc op that splits K, timed with each reduce on the same input.
struct SplitKRecord {
  std::string op;
  int split_k;
  double separate[3], fused[3];  // median, p20, p80 (ms)
  bool bit_identical;
};
struct Result {
  int batch;
  double total_ms, forward_ms;
  long long total_macs;
  std::vector<LayerRecord> layers;
  std::vector<SplitKRecord> splitk;
};

double gflops(long long macs, double ms) { return macs == 0 || ms <= 0 ? NAN : 2.0 * macs / (ms * 1e6); }

std::string fmt_macs(long long m) {
  if (m == 0) return "-";
  return m >= 1000000000LL ? fixed(m / 1e9, 2) + "G" : fixed(m / 1e6, 1) + "M";
}
std::string fmt_gflops(double g) { return std::isnan(g) ? "-" : fixed(g, 1); }

std::vector<std::string> group_cells(double ms, int batch, double percent, double g) {
  return {fixed(ms, 3), fixed(ms / batch, 3), fixed(percent, 1), fmt_gflops(g)};
}

struct ByType {
  double ms = 0;
  long long macs = 0;
};
std::map<std::string, ByType> by_type(const Result &r) {
  std::map<std::string, ByType> out;
  for (auto t : kTypeOrder) out[t] = {};
  for (const auto &l : r.layers) {
    out[l.type].ms += l.median;
    out[l.type].macs += l.macs;
  }
  return out;
}

// fastfeat.profile_report._model_table, for one model.
std::string table(const NetDesc &net, const std::vector<Result> &results, const std::string &device,
                  const std::string &device_name, const Options &o) {
  std::vector<std::vector<std::string>> rows;
  std::vector<std::string> head = {"", "", "", ""}, cols = {"layer", "type", "out/img", "MACs/img"};
  const char *group_cols[] = {"ms/batch", "ms/img", "%", "GFLOP/s"};
  for (const auto &r : results)
    for (int i = 0; i < 4; i++) {
      head.push_back(i == 0 ? "native b=" + std::to_string(r.batch) : "");
      cols.push_back(group_cols[i]);
    }
  rows.push_back(head);
  rows.push_back(cols);
  bool fused = false;
  std::vector<std::map<std::string, std::vector<std::string>>> cells(results.size());
  for (size_t i = 0; i < results.size(); i++)
    for (const auto &l : results[i].layers) {
      cells[i][l.covers[0]] = group_cells(l.median, results[i].batch, l.percent, l.gflops);
      for (size_t c = 1; c < l.covers.size(); c++) cells[i][l.covers[c]] = {"(fused)", "", "", ""}, fused = true;
    }
  long long total_macs = 0;
  for (const auto &layer : net.layers) {
    std::vector<std::string> row = {layer.name, layer.kind, layer.shape, fmt_macs(layer.macs)};
    total_macs += layer.macs;
    for (auto &c : cells) {
      auto it = c.find(layer.name);
      auto v = it == c.end() ? std::vector<std::string>{"", "", "", ""} : it->second;
      row.insert(row.end(), v.begin(), v.end());
    }
    rows.push_back(row);
  }
  std::vector<std::string> total = {"total", "", "", fmt_macs(total_macs)};
  for (const auto &r : results) {
    auto v = group_cells(r.total_ms, r.batch, 100.0, gflops(r.total_macs, r.total_ms));
    total.insert(total.end(), v.begin(), v.end());
  }
  rows.push_back(total);
  std::vector<std::string> by = {fused ? "by type (a fused op counts as the type of its first layer)" : "by type"};
  by.resize(rows[1].size());
  rows.push_back(by);
  std::vector<std::map<std::string, ByType>> types;
  for (const auto &r : results) types.push_back(by_type(r));
  for (auto kind : kTypeOrder) {
    long long kind_macs = 0;
    for (const auto &layer : net.layers)
      if (std::string(layer.kind) == kind) kind_macs += layer.macs;
    std::vector<std::string> row = {kind, "", "", fmt_macs(kind_macs)};
    for (size_t i = 0; i < results.size(); i++) {
      const ByType &e = types[i][kind];
      double pct = results[i].total_ms > 0 ? 100.0 * e.ms / results[i].total_ms : 0.0;
      auto v = group_cells(e.ms, results[i].batch, pct, gflops(e.macs, e.ms));
      row.insert(row.end(), v.begin(), v.end());
    }
    rows.push_back(row);
  }
  // _render: the first three columns flush left, the rest flush right; two spaces apart.
  std::vector<size_t> widths(rows[1].size(), 0);
  for (const auto &row : rows)
    for (size_t i = 0; i < row.size(); i++) widths[i] = std::max(widths[i], row[i].size());
  std::vector<std::string> lines;
  for (auto row : rows) {
    row.resize(widths.size());
    std::string line;
    for (size_t i = 0; i < row.size(); i++) {
      std::string pad(widths[i] - row[i].size(), ' ');
      line += (i ? "  " : "") + (i < 3 ? row[i] + pad : pad + row[i]);
    }
    while (!line.empty() && line.back() == ' ') line.pop_back();
    lines.push_back(line);
  }
  size_t sep = 0;
  for (const auto &l : lines) sep = std::max(sep, l.size());
  std::string out = net.name + std::string(" on ") + device + " (" + device_name + "), " + o.precision +
                    "; median of " + std::to_string(o.repeat) + " runs per op after " + std::to_string(o.warmup) +
                    " warm-up runs\n";
  size_t n_layers = net.layers.size();
  for (size_t i = 0; i < lines.size(); i++) {
    if (i == 2 || i == 2 + n_layers) out += std::string(sep, '-') + "\n";
    out += lines[i] + "\n";
  }
  return out;
}

std::string to_json(const NetDesc &net, const std::vector<Result> &results, const std::string &device,
                    const std::string &device_name, const Options &o) {
  char date[32];
  std::time_t now = std::time(nullptr);
  std::strftime(date, sizeof date, "%Y-%m-%dT%H:%M:%SZ", std::gmtime(&now));
  std::string s = "[\n";
  for (size_t i = 0; i < results.size(); i++) {
    const Result &r = results[i];
    s += " {\n  \"model\": " + jstr(net.name) + ",\n  \"backend\": \"native\",\n  \"device\": " + jstr(device) +
         ",\n  \"device_name\": " + jstr(device_name) + ",\n  \"precision\": " + jstr(o.precision) +
         ",\n  \"batch_size\": " + std::to_string(r.batch) + ",\n  \"total_ms\": " + jnum(r.total_ms) +
         ",\n  \"layers\": [";
    for (size_t j = 0; j < r.layers.size(); j++) {
      const LayerRecord &l = r.layers[j];
      std::string covers, shape;
      for (size_t c = 0; c < l.covers.size(); c++) covers += (c ? ", " : "") + jstr(l.covers[c]);
      for (size_t c = 0; c < l.shape.size(); c++) shape += (c ? ", " : "") + std::to_string(l.shape[c]);
      s += std::string(j ? "," : "") + "\n   {\"name\": " + jstr(l.name) + ", \"type\": " + jstr(l.type) +
           ", \"covers\": [" + covers + "], \"macs\": " + std::to_string(l.macs) + ", \"ms_median\": " +
           jnum(l.median) + ", \"ms_p20\": " + jnum(l.p20) + ", \"ms_p80\": " + jnum(l.p80) + ", \"percent\": " +
           jnum(l.percent) + ", \"shape\": [" + shape + "], \"ms_per_image\": " + jnum(l.ms_per_image) +
           ", \"gflops\": " + jnum(l.gflops) + "}";
    }
    auto types = by_type(r);
    std::string bt;
    for (auto kind : kTypeOrder) {
      const ByType &e = types[kind];
      double pct = r.total_ms > 0 ? 100.0 * e.ms / r.total_ms : 0.0;
      bt += std::string(bt.empty() ? "" : ", ") + jstr(kind) + ": {\"ms\": " + jnum(e.ms) + ", \"percent\": " +
            jnum(pct) + ", \"macs\": " + std::to_string(e.macs) + ", \"gflops\": " + jnum(gflops(e.macs, e.ms)) + "}";
    }
    s += "\n  ],\n  \"fastfeat_version\": " + jstr(kFastfeatVersion) + ",\n  \"git_sha\": null,\n  \"total_macs\": " +
         std::to_string(r.total_macs) + ",\n  \"ms_per_image\": " + jnum(r.total_ms / r.batch) +
         ",\n  \"images_per_s\": " + (r.total_ms > 0 ? jnum(1e3 * r.batch / r.total_ms) : "null") +
         ",\n  \"gflops\": " + jnum(gflops(r.total_macs, r.total_ms)) + ",\n  \"by_type\": {" + bt +
         "},\n  \"repeat\": " + std::to_string(o.repeat) + ",\n  \"warmup\": " + std::to_string(o.warmup) +
         ",\n  \"timer\": \"cuda_events\",\n  \"weights\": \"random\",\n  \"torch_version\": null,\n  \"date\": " +
         jstr(date) + ",\n  \"forward_ms\": " + jnum(r.forward_ms) + ",\n  \"library\": " +
         jstr(fastfeat_build_info()) + ",\n  \"splitk_reduce\": " + jstr(o.splitk_reduce) + ",\n  \"splitk\": [";
    for (size_t j = 0; j < r.splitk.size(); j++) {
      const SplitKRecord &k = r.splitk[j];
      auto times = [](const double *t) {
        return "{\"ms_median\": " + jnum(t[0]) + ", \"ms_p20\": " + jnum(t[1]) + ", \"ms_p80\": " + jnum(t[2]) + "}";
      };
      s += std::string(j ? "," : "") + "\n   {\"op\": " + jstr(k.op) + ", \"batch\": " + std::to_string(r.batch) +
           ", \"split_k\": " + std::to_string(k.split_k) + ", \"separate\": " + times(k.separate) +
           ", \"fused\": " + times(k.fused) + ", \"bit_identical\": " + (k.bit_identical ? "true" : "false") + "}";
    }
    s += std::string(r.splitk.empty() ? "" : "\n  ") + "]\n }" + (i + 1 < results.size() ? "," : "") + "\n";
  }
  return s + "]\n";
}

// -- the split-K reduces side by side (--splitk-reduce both) ----------------------------------------
// The op's output bytes after one call with `reduce`, its output first filled with 0xFF bytes (NaN in every
// float format), so that a launch that writes nothing cannot match.
std::vector<unsigned char> output_of(const BoundOp &b, int dtype, int batch, const Buffer &x, const Buffer &y,
                                     CUstream stream, int reduce, size_t bytes) {
  check_cu(cuStreamSynchronize(stream), "cuStreamSynchronize");
  check_cu(cuMemsetD8(y.ptr, 0xFF, bytes), "cuMemsetD8");
  check_ff(run_op(b, dtype, batch, x.get(), y.get(), stream, reduce), std::string(b.op->name));
  check_cu(cuStreamSynchronize(stream), "cuStreamSynchronize");
  std::vector<unsigned char> host(bytes);
  check_cu(cuMemcpyDtoH(host.data(), y.ptr, bytes), "cuMemcpyDtoH");
  return host;
}

// For an fc op that splits K at `batch`: the fused form timed as the separate one was (`separate_times`),
// and both outputs compared; nothing for an op that does not split K.
template <class TimeOp>
std::unique_ptr<SplitKRecord> compare_splitk(const BoundOp &b, int dtype, int batch, const Buffer &x, const Buffer &y,
                                             CUstream stream, int arch, int sms,
                                             const std::vector<double> &separate_times, TimeOp time_op) {
  fastfeat_gemm_desc d = fc_desc(*b.op, batch, b.w_row_stride, FASTFEAT_SPLITK_FUSED);
  fastfeat_plan plan;
  check_ff(fastfeat_gemm_plan(arch, sms, dtype, &d, &plan), std::string(b.op->name) + " fused plan");
  if (plan.split_k < 2) return nullptr;
  auto rec = std::make_unique<SplitKRecord>();
  rec->op = b.op->name;
  rec->split_k = plan.split_k;
  std::vector<double> fused_times = time_op(FASTFEAT_SPLITK_FUSED);
  const std::vector<double> *sets[] = {&separate_times, &fused_times};
  double *outs[] = {rec->separate, rec->fused};
  for (int f = 0; f < 2; f++) {
    outs[f][0] = percentile(*sets[f], 50), outs[f][1] = percentile(*sets[f], 20), outs[f][2] = percentile(*sets[f], 80);
  }
  size_t elem = dtype == FASTFEAT_FP32 ? 4 : 2;
  size_t bytes = static_cast<size_t>(batch) * static_cast<size_t>(b.op->p[0]) * elem;
  rec->bit_identical = output_of(b, dtype, batch, x, y, stream, FASTFEAT_SPLITK_SEPARATE, bytes) ==
                       output_of(b, dtype, batch, x, y, stream, FASTFEAT_SPLITK_FUSED, bytes);
  return rec;
}

// -- the benchmark ---------------------------------------------------------------------------------
int run(const Options &o) {
  const NetDesc *net = find_net(o.model);
  if (!net) {
    std::string names;
    for (const auto &n : kNetworks) names += std::string(names.empty() ? "" : ", ") + n.name;
    usage("unknown model '" + o.model + "'; choose from " + names);
  }
  if (fastfeat_abi_version() != FASTFEAT_KERNELS_ABI_VERSION)  // a library from an older build beside this one
    throw Failure{"libfastfeat_kernels has ABI version " + std::to_string(fastfeat_abi_version()) +
                      ", this benchmark was built for " + std::to_string(FASTFEAT_KERNELS_ABI_VERSION) + ": rebuild",
                  kExitFailed};
  CUresult r = ff_cuda_load();
  if (r != CUDA_SUCCESS) {
    int status = r == CUDA_ERROR_SHARED_OBJECT_INIT_FAILED ? FASTFEAT_ERR_NO_DRIVER : FASTFEAT_ERR_NO_DEVICE;
    std::fprintf(stderr, "fastfeat-layer-bench: %s (%s)\n", fastfeat_status_string(status), ff_cuda_driver_error());
    return kExitNoGpu;
  }
  CUdevice dev;
  CUcontext ctx;
  int count = 0;
  if (cuDeviceGetCount(&count) != CUDA_SUCCESS || o.device >= count) {
    std::fprintf(stderr, "fastfeat-layer-bench: %s (device %d of %d)\n", fastfeat_status_string(FASTFEAT_ERR_NO_DEVICE),
                 o.device, count);
    return kExitNoGpu;
  }
  check_cu(cuDeviceGet(&dev, o.device), "cuDeviceGet");
  check_cu(cuDevicePrimaryCtxRetain(&ctx, dev), "cuDevicePrimaryCtxRetain");
  check_cu(cuCtxSetCurrent(ctx), "cuCtxSetCurrent");
  int arch = 0, sms = 0;
  int status = fastfeat_check_device(&arch, &sms);
  if (status != FASTFEAT_OK) {
    std::fprintf(stderr, "fastfeat-layer-bench: %s (compute capability %d.%d)\n", fastfeat_status_string(status),
                 arch / 10, arch % 10);
    return kExitNoGpu;
  }
  char name[256] = "unknown GPU";
  cuDeviceGetName(name, sizeof name, dev);
  std::string device = "cuda:" + std::to_string(o.device), device_name = name;
  int dtype = dtype_of(o.precision);
  size_t elem = o.precision == "fp32" ? 4 : 2;
  int max_batch = *std::max_element(o.batches.begin(), o.batches.end());
  std::mt19937 rng(0);

  std::vector<BoundOp> ops;
  std::vector<Buffer> acts;  // acts[i] is op i's input; acts.back() the output
  acts.push_back(random_buffer(static_cast<size_t>(max_batch) * 3 * net->input_size * net->input_size, o.precision,
                               1.0f, rng));
  for (const auto &op : net->ops) {
    BoundOp b{&op, {}, {}, {}, 0};
    if (op.family == FF_OP_CONV || op.family == FF_OP_FC) {
      long long fan_in = op.family == FF_OP_CONV ? (long long)op.p[2] * op.p[2] * op.in[0] / op.p[1] : prod(op.in, op.in_rank);
      float scale = std::sqrt(2.0f / static_cast<float>(fan_in));  // He init: activations stay O(1)
      if (op.family == FF_OP_CONV) {
        b.weight = random_buffer(static_cast<size_t>(op.p[0]) * fan_in, o.precision, scale, rng);
      } else {
        b.w_row_stride = (op.p[0] + 15) / 16 * 16;  // pack_linear_weight's padding
        b.weight = random_buffer(static_cast<size_t>(fan_in) * b.w_row_stride, o.precision, scale, rng);
        size_t ws = 0;
        for (int batch : o.batches) {
          fastfeat_gemm_desc d = fc_desc(op, batch, b.w_row_stride, FASTFEAT_SPLITK_SEPARATE);
          size_t need = 0;
          check_ff(fastfeat_gemm_workspace_bytes(&d, &need), std::string(op.name) + " workspace");
          ws = std::max(ws, need);
          if (o.splitk_reduce == "separate") continue;
          d.split_k_reduce = FASTFEAT_SPLITK_FUSED;
          check_ff(fastfeat_gemm_workspace_bytes(&d, &need), std::string(op.name) + " fused workspace");
          if (!need) continue;
          Buffer fused(need);
          check_cu(cuMemsetD8(fused.ptr, 0, need), "cuMemsetD8");  // once: every fused launch leaves it zero
          b.fused_workspace.emplace(batch, std::move(fused));
        }
        if (ws) b.workspace = Buffer(ws);
      }
      b.bias = random_buffer(static_cast<size_t>(op.p[0]), "fp32", 0.01f, rng);
    }
    acts.push_back(Buffer(static_cast<size_t>(max_batch) * prod(op.out, op.out_rank) * elem));
    ops.push_back(std::move(b));
  }

  CUstream stream;
  CUevent start, end;
  check_cu(cuStreamCreate(&stream, 0), "cuStreamCreate");
  check_cu(cuEventCreate(&start, 0), "cuEventCreate");
  check_cu(cuEventCreate(&end, 0), "cuEventCreate");
  auto elapsed = [&]() {
    float ms = 0;
    check_cu(cuEventSynchronize(end), "cuEventSynchronize");
    check_cu(cuEventElapsedTime(&ms, start, end), "cuEventElapsedTime");
    return static_cast<double>(ms);
  };
  std::map<std::string, long long> layer_macs;
  std::map<std::string, std::string> layer_shape;
  for (const auto &l : net->layers) layer_macs[l.name] = l.macs, layer_shape[l.name] = l.shape;

  // The reduce of the table and the whole forward; "both" adds the fused form beside it.
  int reduce = o.splitk_reduce == "fused" ? FASTFEAT_SPLITK_FUSED : FASTFEAT_SPLITK_SEPARATE;
  bool mismatch = false;
  std::vector<Result> results;
  for (int batch : o.batches) {
    std::fprintf(stderr, "profiling %s native batch %d on %s (%s, repeat %d)\n", net->name, batch, device.c_str(),
                 o.precision.c_str(), o.repeat);
    Result res{batch, 0, 0, 0, {}, {}};
    for (size_t i = 0; i < ops.size(); i++) {
      const OpDesc &op = *ops[i].op;
      auto time_op = [&](int form) {
        auto call = [&]() {
          check_ff(run_op(ops[i], dtype, batch, acts[i].get(), acts[i + 1].get(), stream, form), std::string(op.name));
        };
        for (int w = 0; w < o.warmup; w++) call();
        std::vector<double> times;
        for (int rep = 0; rep < o.repeat; rep++) {
          // Nothing else may be queued before `start`, or its time would be charged to this op.
          check_cu(cuStreamSynchronize(stream), "cuStreamSynchronize");
          check_cu(cuEventRecord(start, stream), "cuEventRecord");
          call();
          check_cu(cuEventRecord(end, stream), "cuEventRecord");
          times.push_back(elapsed());
        }
        return times;
      };
      std::vector<double> times = time_op(reduce);
      if (op.family == FF_OP_FC && o.splitk_reduce == "both")
        if (auto k = compare_splitk(ops[i], dtype, batch, acts[i], acts[i + 1], stream, arch, sms, times, time_op)) {
          mismatch = mismatch || !k->bit_identical;
          std::printf("%s b=%d split-K %d: separate %.4f ms, fused %.4f ms (median), outputs %s\n", op.name, batch,
                      k->split_k, k->separate[0], k->fused[0], k->bit_identical ? "bit-identical" : "DIFFER");
          res.splitk.push_back(*k);
        }
      LayerRecord l;
      l.name = op.name;
      l.type = op.kind;
      l.macs = 0;
      for (int c = 0; c < op.n_covers; c++) {
        l.covers.push_back(op.covers[c]);
        l.macs += layer_macs[op.covers[c]] * batch;
      }
      l.median = percentile(times, 50), l.p20 = percentile(times, 20), l.p80 = percentile(times, 80);
      std::stringstream ss(layer_shape[op.covers[op.n_covers - 1]]);
      for (std::string d; std::getline(ss, d, 'x');) l.shape.push_back(std::stoi(d));
      l.ms_per_image = l.median / batch;
      l.gflops = gflops(l.macs, l.median);
      res.total_ms += l.median;
      res.total_macs += l.macs;
      res.layers.push_back(l);
    }
    for (auto &l : res.layers) l.percent = res.total_ms > 0 ? 100.0 * l.median / res.total_ms : 0.0;
    // The whole forward back to back: what a caller sees without per-op synchronisation.
    std::vector<double> fwd;
    for (int rep = 0; rep < o.repeat; rep++) {
      check_cu(cuStreamSynchronize(stream), "cuStreamSynchronize");
      check_cu(cuEventRecord(start, stream), "cuEventRecord");
      for (size_t i = 0; i < ops.size(); i++)
        check_ff(run_op(ops[i], dtype, batch, acts[i].get(), acts[i + 1].get(), stream, reduce), ops[i].op->name);
      check_cu(cuEventRecord(end, stream), "cuEventRecord");
      fwd.push_back(elapsed());
    }
    res.forward_ms = percentile(fwd, 50);
    results.push_back(res);
  }
  std::printf("%s", table(*net, results, device, device_name, o).c_str());
  for (const auto &r : results)
    std::printf("whole forward, back to back, b=%d: %.3f ms (%.1f images/s)\n", r.batch, r.forward_ms,
                1e3 * r.batch / r.forward_ms);
  if (!o.json.empty()) {
    FILE *f = std::fopen(o.json.c_str(), "w");
    if (!f) throw Failure{"cannot write " + o.json, kExitFailed};
    std::string text = to_json(*net, results, device, device_name, o);
    std::fwrite(text.data(), 1, text.size(), f);
    std::fclose(f);
  }
  cuEventDestroy(start);
  cuEventDestroy(end);
  cuStreamDestroy(stream);
  if (mismatch) throw Failure{"the fused and the separate split-K reduce gave different outputs", kExitFailed};
  return 0;
}

}  // namespace

int main(int argc, char **argv) {
  Options o = parse(argc, argv);
  try {
    return run(o);
  } catch (const Failure &f) {
    std::fprintf(stderr, "fastfeat-layer-bench: %s\n", f.what.c_str());
    return f.exit_code;
  }
}
