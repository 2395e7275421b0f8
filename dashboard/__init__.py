"""rune-dashboard: the operators' web dashboard (live sessions, observe, kill, search, playback)."""
