package main

import (
	"os"
	"os/exec"
	"syscall"
	"unsafe"
)

// setParentDeathSignal makes the kernel send SIGTERM to the command if
// shadowctl dies (even by SIGKILL): its lock died with its connection.
func setParentDeathSignal(cmd *exec.Cmd) {
	if cmd.SysProcAttr == nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{}
	}
	cmd.SysProcAttr.Pdeathsig = syscall.SIGTERM
}

// fromKeyboard reports whether s is a keyboard signal (SIGINT, SIGQUIT) that
// the terminal has already delivered to the command: shadowctl's process group
// (which the command shares) is the foreground group of its terminal.
func fromKeyboard(s os.Signal) bool {
	if s != syscall.SIGINT && s != syscall.SIGQUIT {
		return false
	}
	for _, fd := range []uintptr{0, 1, 2} {
		var fg int32
		if _, _, errno := syscall.Syscall(syscall.SYS_IOCTL, fd, syscall.TIOCGPGRP, uintptr(unsafe.Pointer(&fg))); errno == 0 {
			return int(fg) == syscall.Getpgrp()
		}
	}
	return false
}
