/* autolr.h - dependency-free runtime for exported MLR-SNet learning-rate controllers.
 *
 * Reads the file written by autolr_fast.export.export() (a TorchScript zip archive that
 * carries the weights as the stored entry <archive>/extra/autolr/weights.bin, ALRW format, see
 * docs/runtime.md) and computes, per training step, the learning rate from the training loss.
 * No libtorch, no Python, no zlib. Thread safety: one handle per thread (a handle is not
 * locked); different handles are independent. Error messages are per thread.
 *
 *     autolr_runtime* rt;
 *     if (autolr_open_file("controller.pt", &rt) != AUTOLR_OK) { puts(autolr_last_error()); }
 *     for (...) { float lr = autolr_step(rt, loss); ... }
 *     autolr_free(rt);
 */
#ifndef AUTOLR_H
#define AUTOLR_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32) && defined(AUTOLR_SHARED)
#  ifdef AUTOLR_BUILDING
#    define AUTOLR_API __declspec(dllexport)
#  else
#    define AUTOLR_API __declspec(dllimport)
#  endif
#elif defined(__GNUC__)
#  define AUTOLR_API __attribute__((visibility("default")))
#else
#  define AUTOLR_API
#endif

#define AUTOLR_FORMAT_VERSION 1
/* the runtime's version; autolr_version() returns the same as a string */
#define AUTOLR_VERSION_MAJOR 0
#define AUTOLR_VERSION_MINOR 1
#define AUTOLR_VERSION_PATCH 0

/* Status codes (0 = success, negative = error; autolr_last_error() says what and why). */
enum {
  AUTOLR_OK = 0,
  AUTOLR_E_IO = -1,        /* the file could not be opened or read */
  AUTOLR_E_FORMAT = -2,    /* not a zip / TorchScript archive, or no ALRW entry, or bad ALRW header */
  AUTOLR_E_VERSION = -3,   /* ALRW format version not supported */
  AUTOLR_E_CORRUPT = -4,   /* sizes, bounds or CRC32 do not match: truncated or corrupted */
  AUTOLR_E_ARGUMENT = -5,  /* bad argument (NULL handle, wrong buffer size, non-finite state) */
  AUTOLR_E_MEMORY = -6     /* out of memory */
};

typedef struct autolr_runtime autolr_runtime;

/* Open an exported controller file. On success *out is a new handle (free with autolr_free);
 * on failure *out is NULL and the return value is a negative AUTOLR_E_* code. */
AUTOLR_API int autolr_open_file(const char* path, autolr_runtime** out);
/* The same from the file's bytes in memory (copied; the buffer may be freed afterwards). */
AUTOLR_API int autolr_open_memory(const void* data, size_t size, autolr_runtime** out);
/* From the bare ALRW bytes (the extra entry alone, not inside a zip). */
AUTOLR_API int autolr_open_weights(const void* data, size_t size, autolr_runtime** out);
AUTOLR_API void autolr_free(autolr_runtime* rt);

/* One step: reads the training loss, returns the learning rate gamma * p in [0, gamma].
 * A NaN/Inf loss (or a non-finite controller output) keeps the state and returns the previous
 * rate; a negative loss is clamped to 0. Returns NaN only for a NULL handle. */
AUTOLR_API float autolr_step(autolr_runtime* rt, float loss);
/* Zero h, c and the rate (the start of a new training run). The scale gamma is kept: a file
 * exported from AutoLR's default (lr-anchored) scale carries the gamma its run was anchored
 * at; for a new run anchor again with autolr_anchor on the run's first loss. */
AUTOLR_API int autolr_reset(autolr_runtime* rt);
/* AutoLR's default scale for a new run: settle the controller on the run's first finite loss
 * (300 steps, as AutoLR does), then set gamma so that the settled rate is lr (the peak rate you
 * would give the optimizer); autolr_step(rt, loss) on the same loss then returns about lr.
 * Returns AUTOLR_E_ARGUMENT (state and gamma unchanged) for a non-finite loss, an lr that is
 * not positive and finite, or a controller that settles below p = 1e-3 on this loss. */
AUTOLR_API int autolr_anchor(autolr_runtime* rt, float loss, float lr);
/* Set the rate scale (a positive finite number; the rate is clamped to it). The state of
 * autolr_get_state is [h, c, rate] without gamma: a checkpoint of an anchored run saves
 * autolr_gamma(rt) too, and a resume calls autolr_set_gamma before autolr_set_state. */
AUTOLR_API int autolr_set_gamma(autolr_runtime* rt, float gamma);

AUTOLR_API float autolr_rate(const autolr_runtime* rt);   /* current rate */
AUTOLR_API float autolr_gamma(const autolr_runtime* rt);  /* rate scale */
AUTOLR_API int autolr_hidden_size(const autolr_runtime* rt);
AUTOLR_API int autolr_num_layers(const autolr_runtime* rt);
/* steps skipped: a NaN/Inf loss, or a non-finite controller output (the state is kept) */
AUTOLR_API uint64_t autolr_skipped_steps(const autolr_runtime* rt);

/* State = [h (layers*hidden), c (layers*hidden), rate], float32. */
AUTOLR_API size_t autolr_state_size(const autolr_runtime* rt);
AUTOLR_API int autolr_get_state(const autolr_runtime* rt, float* buf, size_t n);
/* Checked whole (size, finite values, 0 <= rate <= gamma) before anything changes. */
AUTOLR_API int autolr_set_state(autolr_runtime* rt, const float* buf, size_t n);

/* Message of the last failed call on this thread ("" if none). Valid until the next call. */
AUTOLR_API const char* autolr_last_error(void);
/* Library version string, e.g. "0.1.0 (ALRW v1)". */
AUTOLR_API const char* autolr_version(void);

#ifdef __cplusplus
}
#endif
#endif /* AUTOLR_H */
