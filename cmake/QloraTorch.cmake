# cmake/QloraTorch.cmake: find LibTorch from the pip wheel (torch==2.14.1, a CUDA 13.0 build) on machines with the
# CUDA toolkit but no GPU. Used by qlora's own build and by the installed qloraConfig.cmake.
#
# A CUDA build of torch runs its CUDA detection inside find_package(Torch) even for CPU-only consumers, so:
#   - the toolkit root comes from CUDA_HOME, else /usr/local/cuda;
#   - TORCH_CUDA_ARCH_LIST is taken from QLORA_CUDA_ARCHS when the environment does not set it (torch's own
#     auto-detection needs a visible GPU);
#   - libnvrtc is looked up in the toolkit and in the wheel's nvidia/cu13 directory (the wheel links it from there).
macro(qlora_find_torch)
  if(NOT CUDA_TOOLKIT_ROOT_DIR)
    if(DEFINED ENV{CUDA_HOME})
      set(CUDA_TOOLKIT_ROOT_DIR "$ENV{CUDA_HOME}")
    elseif(EXISTS /usr/local/cuda)
      set(CUDA_TOOLKIT_ROOT_DIR /usr/local/cuda)
    endif()
  endif()
  if(CUDA_TOOLKIT_ROOT_DIR AND NOT CMAKE_CUDA_COMPILER AND EXISTS "${CUDA_TOOLKIT_ROOT_DIR}/bin/nvcc")
    set(CMAKE_CUDA_COMPILER "${CUDA_TOOLKIT_ROOT_DIR}/bin/nvcc")
  endif()
  if(NOT DEFINED ENV{TORCH_CUDA_ARCH_LIST})
    if(NOT QLORA_CUDA_ARCHS)
      set(QLORA_CUDA_ARCHS "8.0;9.0")
    endif()
    set(ENV{TORCH_CUDA_ARCH_LIST} "${QLORA_CUDA_ARCHS}")
  endif()
  find_file(_qlora_torch_config TorchConfig.cmake PATH_SUFFIXES Torch share/cmake/Torch)
  if(_qlora_torch_config)
    get_filename_component(_qlora_site "${_qlora_torch_config}/../../../../.." ABSOLUTE)
    if(NOT CUDA_nvrtc_LIBRARY)
      find_library(CUDA_nvrtc_LIBRARY NAMES nvrtc libnvrtc.so.13 libnvrtc.so.12
        HINTS "${CUDA_TOOLKIT_ROOT_DIR}/lib64" "${_qlora_site}/nvidia/cu13/lib" "${_qlora_site}/nvidia/cuda_nvrtc/lib")
    endif()
  endif()
  # torch 2.14 headers need C++20, for nvcc too, and CMake 3.25 does not know nvcc's C++20 flag. Enable CUDA here
  # (torch's own enable_language then does nothing), teach CMake the flag, and ask for the dialect.
  if(CMAKE_CUDA_COMPILER)
    enable_language(CUDA)
    set(CMAKE_CUDA20_STANDARD_COMPILE_OPTION "-std=c++20")
    set(CMAKE_CUDA20_EXTENSION_COMPILE_OPTION "-std=c++20")
    set(CMAKE_CUDA_STANDARD 20)
    set(CMAKE_CUDA_STANDARD_REQUIRED ON)
  endif()
  find_package(Torch REQUIRED)
  # qlora::torch_cpu: LibTorch without its CUDA half (torch_cpu + c10, torch's headers and ABI flags). The `torch`
  # target also links libtorch_cuda, and loading that costs a process about 270 MB of resident memory before it does
  # anything (relocations and static initializers of torch_cuda and the CUDA libraries it pulls in), GPU or not.
  # qlora::ops and the trainer link this; only qlora::ops_cuda links `torch`.
  if(NOT TARGET qlora::torch_cpu)
    add_library(qlora::torch_cpu INTERFACE IMPORTED)
    set_target_properties(qlora::torch_cpu PROPERTIES
      INTERFACE_INCLUDE_DIRECTORIES "${TORCH_INCLUDE_DIRS}"
      INTERFACE_COMPILE_OPTIONS "${TORCH_CXX_FLAGS}"
      INTERFACE_LINK_LIBRARIES "torch_cpu;c10")
  endif()
endmacro()
