// DIR/timeline.json: every rank's spans merged into one Chrome / Perfetto trace (open it in
// ui.perfetto.dev). One process track per rank, with a "steps" thread and a "communication"
// thread; each pipeline send is joined to its receive by a flow arrow.
#pragma once

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <vector>

#include "engine/trace.h"

namespace dilu {

// A rank's spans as bytes (to gather them over the world communicator), and back.
std::vector<uint8_t> encode_timeline(const RankTimeline& t);
RankTimeline decode_timeline(const std::vector<uint8_t>& bytes);

// Writes the merged trace one rank at a time (rank 0 never holds every rank's spans at once).
// Flow ids come from the transfer itself (sender, receiver, sequence number), so a send and its
// receive match without either rank knowing the other's spans.
class TimelineWriter {
 public:
  // UserError naming the path when it cannot be written.
  explicit TimelineWriter(const std::filesystem::path& path);
  void add(const RankTimeline& rank);
  void close();

 private:
  void event_separator();
  std::filesystem::path path_;
  std::ofstream out_;
  bool first_ = true;
};

}  // namespace dilu
