// The fastloss._C_cuda extension module: one register_<op>_cuda per op binding in this folder
// (each in its own <op>_binding.cpp). Like them, it includes no CUDA header.
#include <torch/extension.h>

namespace fastloss {
void register_pdl_cuda(pybind11::module& m);
void register_d2sm_cuda(pybind11::module& m);
void register_mdf_cuda(pybind11::module& m);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastloss CUDA ops";
  fastloss::register_pdl_cuda(m);
  fastloss::register_d2sm_cuda(m);
  fastloss::register_mdf_cuda(m);
}
