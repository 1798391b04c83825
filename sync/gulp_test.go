package sync

import (
	"bytes"
	"errors"
	"io"
	"net"
	"os"
	"runtime"
	"sync/atomic"
	"testing"
	"time"
)

// The pause is long here so that "waited for it" and "did not wait for it"
// stay far apart on a loaded machine.
const testPause = 300 * time.Millisecond

// loopback returns a gulping client socket and the server end writing to it.
func loopback(t *testing.T) (*gulpConn, net.Conn) {
	t.Helper()
	if runtime.GOOS != "linux" {
		t.Skip("the low-water mark is set on Linux only")
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	accepted := make(chan net.Conn, 1)
	go func() {
		c, _ := ln.Accept()
		accepted <- c
	}()
	nc, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	raw, err := nc.(*net.TCPConn).SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	srv := <-accepted
	if srv == nil {
		t.Fatal("accept failed")
	}
	t.Cleanup(func() { nc.Close(); srv.Close() })
	return &gulpConn{Conn: nc, raw: raw, pause: testPause, eagerUntil: new(atomic.Int64)}, srv
}

// timedRead reads once and says how long it took.
func timedRead(t *testing.T, c *gulpConn, buf []byte) (int, time.Duration) {
	t.Helper()
	start := time.Now()
	n, err := c.Read(buf)
	if err != nil {
		t.Fatalf("read: %v", err)
	}
	return n, time.Since(start)
}

// countingReader counts the reads that returned data.
type countingReader struct {
	r     io.Reader
	reads int
}

func (c *countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	if n > 0 {
		c.reads++
	}
	return n, err
}

func TestGulpConnBusyReadsATrickleInFewGulps(t *testing.T) {
	c, srv := loopback(t)
	c.setBusy(true)
	if !c.busy {
		t.Fatal("the low-water mark could not be set")
	}
	// 100 small messages, one every 2 ms, as the WAL sender sends them at
	// the tip: read as they come, that is about 100 reads.
	var want bytes.Buffer
	for i := 0; i < 100; i++ {
		want.Write(bytes.Repeat([]byte{byte('A' + i%26)}, 100))
	}
	go func() {
		b := want.Bytes()
		for i := 0; i < len(b); i += 100 {
			if _, err := srv.Write(b[i : i+100]); err != nil {
				return
			}
			time.Sleep(2 * time.Millisecond)
		}
	}()
	cr := &countingReader{r: c}
	got := make([]byte, want.Len())
	if _, err := io.ReadFull(cr, got); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want.Bytes()) {
		t.Fatal("bytes read in gulps differ from the bytes written")
	}
	if cr.reads > 20 {
		t.Fatalf("%d reads for 100 messages: the reader was woken for each instead of in gulps", cr.reads)
	}
	t.Logf("100 messages in %d reads", cr.reads)
}

func TestGulpConnReadsAtOnceAfterAMarker(t *testing.T) {
	c, srv := loopback(t)
	c.setBusy(true)
	c.eagerUntil.Store(time.Now().Add(time.Minute).UnixNano()) // as the applier does for a cutover's marker
	if _, err := srv.Write([]byte("marker")); err != nil {
		t.Fatal(err)
	}
	n, took := timedRead(t, c, make([]byte, 1024))
	if n != len("marker") {
		t.Fatalf("read %d bytes", n)
	}
	if took >= testPause/2 {
		t.Fatalf("read after a marker took %s: it should not wait for a gulp", took)
	}
	if c.busy {
		t.Fatal("still gulping after a marker")
	}
	// Reads in quick succession do not make it busy while eager.
	for i := 0; i < 3; i++ {
		if _, err := srv.Write([]byte("x")); err != nil {
			t.Fatal(err)
		}
		timedRead(t, c, make([]byte, 16))
	}
	if c.busy {
		t.Fatal("gulping within the eager window")
	}
}

func TestGulpConnTurnsBusyWhenReadsComeFast(t *testing.T) {
	c, srv := loopback(t)
	for i := 0; i < 3 && !c.busy; i++ {
		if _, err := srv.Write([]byte("change")); err != nil {
			t.Fatal(err)
		}
		timedRead(t, c, make([]byte, 16))
	}
	if !c.busy {
		t.Fatalf("three reads within %s did not turn gulping on", testPause)
	}
}

func TestGulpConnKeepsTheCallersDeadline(t *testing.T) {
	c, _ := loopback(t)
	c.setBusy(true)
	if err := c.SetReadDeadline(time.Now().Add(20 * time.Millisecond)); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	_, err := c.Read(make([]byte, 16))
	took := time.Since(start)
	if !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("read with nothing sent returned %v, want the caller's timeout", err)
	}
	if took >= testPause {
		t.Fatalf("the caller's 20ms deadline came after %s: the pause overrode it", took)
	}
}
