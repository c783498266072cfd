// The few CUDA runtime calls the Rust side needs, as flat C functions returning cudaError_t,
// so that the crate needs no CUDA headers or bindings and links only the static cudart.
#include "common.cuh"

extern "C" int kvm_cuda_malloc(void ** p, size_t n) { return (int) cudaMalloc(p, n); }

extern "C" int kvm_cuda_free(void * p) { return (int) cudaFree(p); }

extern "C" int kvm_cuda_h2d(void * dst, const void * src, size_t n, void * stream) {
    return (int) cudaMemcpyAsync(dst, src, n, cudaMemcpyHostToDevice, (cudaStream_t) stream);
}

extern "C" int kvm_cuda_d2h(void * dst, const void * src, size_t n, void * stream) {
    return (int) cudaMemcpyAsync(dst, src, n, cudaMemcpyDeviceToHost, (cudaStream_t) stream);
}

extern "C" int kvm_cuda_memset(void * dst, int v, size_t n, void * stream) {
    return (int) cudaMemsetAsync(dst, v, n, (cudaStream_t) stream);
}

extern "C" int kvm_cuda_sync(void * stream) { return (int) cudaStreamSynchronize((cudaStream_t) stream); }

extern "C" int kvm_cuda_get_device(int * dev) { return (int) cudaGetDevice(dev); }

extern "C" int kvm_cuda_set_device(int dev) { return (int) cudaSetDevice(dev); }

// Which device owns `p`: its ordinal, or -1 for memory no device owns (host memory, or a
// pointer CUDA does not know), so a host pointer is refused before any kernel reads it.
extern "C" int kvm_cuda_pointer_device(const void * p, int * dev) {
    cudaPointerAttributes a;
    const cudaError_t e = cudaPointerGetAttributes(&a, p);
    if (e != cudaSuccess) {
        cudaGetLastError(); // not sticky: clear it so the next call does not report it
        *dev = -1;
        return (int) cudaSuccess;
    }
    *dev = (a.type == cudaMemoryTypeDevice || a.type == cudaMemoryTypeManaged) ? a.device : -1;
    return (int) cudaSuccess;
}

extern "C" const char * kvm_cuda_error_string(int e) { return cudaGetErrorString((cudaError_t) e); }

// Launch errors of the kernels just queued (cleared, unless sticky).
extern "C" int kvm_cuda_last_error(void) { return (int) cudaGetLastError(); }

// Device-to-device copy of `n` bytes, for the bandwidth reference of the benchmark.
extern "C" int kvm_cuda_d2d(void * dst, const void * src, size_t n, void * stream) {
    return (int) cudaMemcpyAsync(dst, src, n, cudaMemcpyDeviceToDevice, (cudaStream_t) stream);
}
