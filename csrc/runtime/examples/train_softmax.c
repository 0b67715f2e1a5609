/* train_softmax.c: softmax regression trained with plain SGD, the learning rate of every step
 * taken from an exported MLR-SNet controller through the autolr C runtime.
 *
 *   train_softmax CONTROLLER.pt [EPOCHS]
 *
 * Data: 3 Gaussian classes in 8 dimensions, generated here (fixed seed). Prints the loss per
 * epoch and exits 0 if the final training loss is below half the initial one. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#include "autolr.h"

enum { N = 600, D = 8, K = 3, BATCH = 32 };

static unsigned long long rng_state = 12345ULL;
static double uniform(void) {
  rng_state = rng_state * 6364136223846793005ULL + 1442695040888963407ULL;
  return ((rng_state >> 11) + 0.5) / 9007199254740992.0;
}
static double gaussian(void) { return sqrt(-2.0 * log(uniform())) * cos(6.283185307179586 * uniform()); }

static float X[N][D];
static int Y[N];

/* mean cross-entropy over rows [lo, hi); accumulates the gradient into gW, gb if not NULL */
static float loss_and_grad(const float W[K][D], const float b[K], int lo, int hi, float gW[K][D], float gb[K]) {
  double total = 0.0;
  for (int n = lo; n < hi; ++n) {
    float z[K], zmax = -1e30f, sum = 0.f;
    for (int k = 0; k < K; ++k) {
      z[k] = b[k];
      for (int d = 0; d < D; ++d) z[k] += W[k][d] * X[n][d];
      if (z[k] > zmax) zmax = z[k];
    }
    for (int k = 0; k < K; ++k) { z[k] = expf(z[k] - zmax); sum += z[k]; }
    total += -log(z[Y[n]] / sum);
    if (gW) {
      for (int k = 0; k < K; ++k) {
        float g = (z[k] / sum - (k == Y[n] ? 1.f : 0.f)) / (float)(hi - lo);
        gb[k] += g;
        for (int d = 0; d < D; ++d) gW[k][d] += g * X[n][d];
      }
    }
  }
  return (float)(total / (hi - lo));
}

int main(int argc, char** argv) {
  if (argc < 2) { fprintf(stderr, "usage: %s CONTROLLER.pt [EPOCHS]\n", argv[0]); return 2; }
  int epochs = argc > 2 ? atoi(argv[2]) : 10;
  autolr_runtime* rt = NULL;
  if (autolr_open_file(argv[1], &rt) != AUTOLR_OK) {
    fprintf(stderr, "cannot load the controller: %s\n", autolr_last_error());
    return 1;
  }
  /* data: class means on a ring, unit noise */
  for (int n = 0; n < N; ++n) {
    Y[n] = n % K;
    for (int d = 0; d < D; ++d) X[n][d] = (float)(gaussian() + (d % K == Y[n] ? 2.0 : 0.0));
  }
  float W[K][D] = {{0}}, b[K] = {0};
  float first = loss_and_grad(W, b, 0, N, NULL, NULL), last = first;
  printf("epoch 0: loss %.4f\n", first);
  for (int e = 1; e <= epochs; ++e) {
    float rate = 0.f;
    for (int lo = 0; lo + BATCH <= N; lo += BATCH) {
      float gW[K][D] = {{0}}, gb[K] = {0};
      float loss = loss_and_grad(W, b, lo, lo + BATCH, gW, gb);
      rate = autolr_step(rt, loss); /* the rate for this step, from this step's loss */
      for (int k = 0; k < K; ++k) {
        b[k] -= rate * gb[k];
        for (int d = 0; d < D; ++d) W[k][d] -= rate * gW[k][d];
      }
    }
    last = loss_and_grad(W, b, 0, N, NULL, NULL);
    printf("epoch %d: loss %.4f  (last rate %.4f)\n", e, last, rate);
  }
  autolr_free(rt);
  if (!(last < 0.5f * first)) {
    fprintf(stderr, "training did not reduce the loss enough (%.4f -> %.4f)\n", first, last);
    return 1;
  }
  return 0;
}
