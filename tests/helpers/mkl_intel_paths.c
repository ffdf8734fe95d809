/* A stand-in for an Intel host (tests/test_first_call_race.py): MKL, linked into libtorch_cpu, asks
 * these through the PLT whether it runs on an Intel CPU, so an LD_PRELOAD'ed definition answers "yes"
 * and MKL takes its Intel code paths (AVX-512 kernels, where the CPU has them) on an AMD CPU, as it
 * does by itself on an Intel Xeon. Nothing else changes. */
int mkl_serv_intel_cpu(void) { return 1; }
int mkl_serv_intel_cpu_true(void) { return 1; }
int mkl_serv_cpuiszen(void) { return 0; }
