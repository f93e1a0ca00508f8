"""The fault suite: kills at random points with exact resume, corrupted dumps, bad command-line
inputs and a full disk, each answered by the tools with one line and a non-zero exit."""
