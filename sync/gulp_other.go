//go:build !linux

package sync

import (
	"errors"
	"syscall"
)

// Elsewhere the stream is read as it comes.
func setRcvLowat(syscall.RawConn, int) error { return errors.ErrUnsupported }
