//go:build !linux

package main

import (
	"os"
	"os/exec"
)

// setParentDeathSignal: only Linux has a parent-death signal.
func setParentDeathSignal(*exec.Cmd) {}

// fromKeyboard: without a portable foreground-group check, forward everything.
func fromKeyboard(os.Signal) bool { return false }
