// On/off switches read from the environment at each call (FASTAP_CPU_HUGE_PAGES, FASTAP_WGMMA):
// unset, empty or "0" is off, "1" on; anything else is an error that names the variable, rather
// than a silent "off" for a "yes" or "true" that meant on.
#pragma once

#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>

namespace fastap {

inline bool environment_switch(const char* name) {
  const char* setting = std::getenv(name);
  if (setting == nullptr || *setting == '\0' || std::strcmp(setting, "0") == 0) return false;
  TORCH_CHECK_VALUE(std::strcmp(setting, "1") == 0, "fastap: ", name,
                    " must be 1 (on) or 0 (off, as when unset), got '", setting, "'");
  return true;
}

}  // namespace fastap
