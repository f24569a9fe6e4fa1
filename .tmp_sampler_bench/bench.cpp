#include "engine/sampler.h"
#include <chrono>
#include <cstdio>
#include <random>
using namespace dilu;
int main() {
  std::mt19937 rng(5); std::normal_distribution<float> nd(0, 3);
  std::vector<float> l(129280); for (auto& x : l) x = nd(rng);
  struct C { double t, p; int64_t k; double m; bool lp; };
  for (C c : {C{0,1,0,0,false}, C{0,1,0,0,true}, C{1,1,0,0,false},C{0.7,0.9,0,0,false},C{1.3,0.5,0,0,false},C{1,1,50,0,false},C{1,1,2000,0,false},C{0.8,0.95,40,0,false},C{1,1,0,0.1,false},C{2.0,0.99,0,0.01,false}, C{0.6,0.95,0,0,true}}) {
    SamplingParams p; p.temperature=c.t; p.top_p=c.p; p.top_k=c.k; p.min_p=c.m; p.logprobs=c.lp; p.top_logprobs = c.lp?5:0;
    auto t0 = std::chrono::steady_clock::now(); int64_t s=0;
    for (int i = 0; i < 100; ++i) s += sample(l, p, 1, 0, i).token;
    double us = std::chrono::duration<double>(std::chrono::steady_clock::now()-t0).count()*1e6/100;
    std::printf("T=%.1f top_p=%.2f top_k=%ld min_p=%.2f logprobs=%d: %.0f us/token (%ld)\n", c.t, c.p, c.k, c.m, c.lp, us, s%7);
  }
}
