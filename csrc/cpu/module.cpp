// The fastloss._C extension: one register_<op> per op source in this folder.
#include <torch/extension.h>

namespace fastloss {
void register_pdl(pybind11::module& m);
void register_mdf(pybind11::module& m);
void register_d2sm(pybind11::module& m);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastloss C++ CPU ops";
  fastloss::register_pdl(m);
  fastloss::register_mdf(m);
  fastloss::register_d2sm(m);
#if defined(__clang__)
  m.attr("compiler") = "clang " __clang_version__;
#elif defined(__GNUC__)
  m.attr("compiler") = "gcc " __VERSION__;
#else
  m.attr("compiler") = "unknown";
#endif
#ifdef _OPENMP
  m.attr("openmp") = true;
#else
  m.attr("openmp") = false;
#endif
}
