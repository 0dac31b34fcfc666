// bnfold artifact runner: loads a TVM Relax VM library, runs "main" once, writes the outputs.
//
// Built for a foreign architecture (e.g. aarch64) and run under qemu-user, it proves that a
// cross-compiled artifact runs, without a Python for that architecture. It uses only the
// tvm/ffi headers (the TVM wheels lack some tvm/runtime headers) and links against
// libtvm_runtime.so + libtvm_ffi.so.
//
// Usage: runner MODEL.so IN.bnt OUT.bnt
// .bnt file: "BNT1", u32 count, then per tensor: u8 code, u8 bits, u16 lanes, u32 ndim,
// i64 shape[ndim], u64 nbytes, raw little-endian data.
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <stdexcept>
#include <vector>

namespace ffi = tvm::ffi;

struct CPUAlloc {
  void AllocData(DLTensor* t) { t->data = std::aligned_alloc(64, (ffi::GetDataSize(*t) + 63) / 64 * 64); }
  void FreeData(DLTensor* t) { std::free(t->data); }
};

template <typename T>
static T ReadPod(std::ifstream& in) {
  T v;
  if (!in.read(reinterpret_cast<char*>(&v), sizeof(T))) throw std::runtime_error("truncated input");
  return v;
}

template <typename T>
static void WritePod(std::ofstream& out, T v) {
  out.write(reinterpret_cast<const char*>(&v), sizeof(T));
}

static std::vector<ffi::Tensor> ReadTensors(const char* path) {
  std::ifstream in(path, std::ios::binary);
  char magic[4];
  if (!in.read(magic, 4) || std::memcmp(magic, "BNT1", 4) != 0) throw std::runtime_error("bad input file");
  uint32_t count = ReadPod<uint32_t>(in);
  std::vector<ffi::Tensor> tensors;
  for (uint32_t i = 0; i < count; ++i) {
    DLDataType dtype;
    dtype.code = ReadPod<uint8_t>(in);
    dtype.bits = ReadPod<uint8_t>(in);
    dtype.lanes = ReadPod<uint16_t>(in);
    uint32_t ndim = ReadPod<uint32_t>(in);
    std::vector<int64_t> shape(ndim);
    for (auto& d : shape) d = ReadPod<int64_t>(in);
    uint64_t nbytes = ReadPod<uint64_t>(in);
    ffi::Tensor t = ffi::Tensor::FromNDAlloc(CPUAlloc(), ffi::ShapeView(shape.data(), shape.size()),
                                             dtype, DLDevice{kDLCPU, 0});
    if (nbytes != ffi::GetDataSize(t)) throw std::runtime_error("size mismatch");
    if (!in.read(static_cast<char*>(t.data_ptr()), nbytes)) throw std::runtime_error("truncated data");
    tensors.push_back(t);
  }
  return tensors;
}

static void Flatten(const ffi::Any& value, std::vector<ffi::Tensor>* out) {
  if (auto t = value.try_cast<ffi::Tensor>()) {
    out->push_back(*t);
  } else if (auto arr = value.try_cast<ffi::Array<ffi::Any>>()) {
    for (const ffi::Any& item : *arr) Flatten(item, out);
  } else {
    throw std::runtime_error("unsupported output type " + value.GetTypeKey());
  }
}

static void WriteTensors(const char* path, const std::vector<ffi::Tensor>& tensors) {
  std::ofstream out(path, std::ios::binary);
  out.write("BNT1", 4);
  WritePod<uint32_t>(out, tensors.size());
  for (const ffi::Tensor& t : tensors) {
    if (!t.IsContiguous()) throw std::runtime_error("non-contiguous output");
    WritePod<uint8_t>(out, t.dtype().code);
    WritePod<uint8_t>(out, t.dtype().bits);
    WritePod<uint16_t>(out, t.dtype().lanes);
    WritePod<uint32_t>(out, t.ndim());
    for (int64_t d : t.shape()) WritePod<int64_t>(out, d);
    uint64_t nbytes = ffi::GetDataSize(t);
    WritePod<uint64_t>(out, nbytes);
    out.write(static_cast<const char*>(t.data_ptr()) + t.byte_offset(), nbytes);
  }
  if (!out) throw std::runtime_error("cannot write output file");
}

int main(int argc, char** argv) {
  if (argc != 4) {
    std::cerr << "usage: " << argv[0] << " MODEL.so IN.bnt OUT.bnt\n";
    return 2;
  }
  try {
    ffi::Module lib = ffi::Module::LoadFromFile(argv[1]);
    ffi::Module vm = lib->GetFunction("vm_load_executable").value()().cast<ffi::Module>();
    // (device type, id, allocator) for the compute device, then the host; 2 = pooled allocator.
    vm->GetFunction("vm_initialization").value()(static_cast<int>(kDLCPU), 0, 2,
                                                 static_cast<int>(kDLCPU), 0, 2);
    std::vector<ffi::Tensor> inputs = ReadTensors(argv[2]);
    std::vector<ffi::AnyView> args(inputs.begin(), inputs.end());
    ffi::Any result;
    vm->GetFunction("main").value().CallPacked(args.data(), static_cast<int32_t>(args.size()), &result);
    std::vector<ffi::Tensor> outputs;
    Flatten(result, &outputs);
    WriteTensors(argv[3], outputs);
  } catch (const std::exception& e) {
    std::cerr << "runner: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
