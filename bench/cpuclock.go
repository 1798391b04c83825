package main

import (
	"context"
	"crypto/sha256"
	"fmt"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
	"unsafe"
)

// cpuClock samples the machine's CPU counters (/proc/stat) through the run,
// so that each measured window can say how busy the machine was and how much
// of its time the hypervisor gave to other guests (steal). The ratios divide
// windows taken seconds to minutes apart; when a neighbour's load moves
// between them, the steal of each window shows it. It also times a fixed
// piece of CPU work four times a second (probe), on the CPU clock of its
// own thread, so that waiting for a core does not count: how long the
// same work takes says how fast the host's cores run in that window. On
// the idle VM it took 1.31–1.63 ms within 40 s, with steal at 0.
type cpuClock struct {
	mu      sync.Mutex
	samples []cpuSample
	probes  []probeSample
}

type probeSample struct {
	at time.Time
	ms float64
}

type cpuSample struct {
	at                 time.Time
	busy, steal, total uint64 // clock ticks since boot, all cores
}

// cpuWindow is the machine's CPU over one window.
type cpuWindow struct {
	// BusyCores is the average number of cores running anything (ours or
	// not), steal excluded.
	BusyCores float64 `json:"busy_cores"`
	// StealShare is the share of all cores' time taken by the hypervisor.
	StealShare float64 `json:"steal_share"`
	// ProbeMs is the median CPU time of the probe's fixed work in the
	// window (0: no sample): higher is a slower host. The work shares the
	// caches with whatever else runs, so it compares windows of one kind
	// (two references, two sync-only windows) best.
	ProbeMs float64 `json:"probe_ms,omitempty"`
}

func (w cpuWindow) String() string {
	s := fmt.Sprintf("%.2f cores busy, steal %.0f %%", w.BusyCores, 100*w.StealShare)
	if w.ProbeMs > 0 {
		s += fmt.Sprintf(", the probe %.2f ms", w.ProbeMs)
	}
	return s
}

// startCPUClock samples every 250 ms until ctx ends; nil where /proc/stat
// cannot be read.
func startCPUClock(ctx context.Context) *cpuClock {
	if _, ok := readCPU(); !ok {
		return nil
	}
	c := &cpuClock{}
	c.sample()
	go c.run(ctx)
	return c
}

func (c *cpuClock) sample() {
	s, ok := readCPU()
	if !ok {
		return
	}
	c.mu.Lock()
	c.samples = append(c.samples, s)
	c.mu.Unlock()
}

// run samples the counters and times the probe's work every 250 ms until
// ctx ends, on a thread of its own (the probe reads that thread's CPU
// clock); the fastest of three runs of the work is the probe's sample (a
// run interrupted by the scheduler pays for the cache it comes back to).
func (c *cpuClock) run(ctx context.Context) {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	buf := make([]byte, 64<<10)
	t := time.NewTicker(250 * time.Millisecond)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			c.sample()
			best := min(probeOnce(buf), probeOnce(buf), probeOnce(buf))
			if best <= 0 {
				continue
			}
			c.mu.Lock()
			c.probes = append(c.probes, probeSample{time.Now(), best})
			c.mu.Unlock()
		}
	}
}

// probeOnce is the probe's work, 40 SHA-256 sums of buf (about 1.3 ms on
// the Intel VM), in milliseconds of this thread's CPU time; 0 when the
// clock cannot be read.
func probeOnce(buf []byte) float64 {
	t0, ok0 := threadCPU()
	for range 40 {
		sha256.Sum256(buf)
	}
	t1, ok1 := threadCPU()
	if !ok0 || !ok1 {
		return 0
	}
	return float64(t1-t0) / float64(time.Millisecond)
}

// threadCPU is CLOCK_THREAD_CPUTIME_ID: the CPU time of the calling thread,
// to the nanosecond (getrusage's per-thread figures move in ticks).
func threadCPU() (time.Duration, bool) {
	var ts syscall.Timespec
	const clockThreadCPUTimeID = 3
	if _, _, errno := syscall.Syscall(syscall.SYS_CLOCK_GETTIME, clockThreadCPUTimeID, uintptr(unsafe.Pointer(&ts)), 0); errno != 0 {
		return 0, false
	}
	return time.Duration(ts.Nano()), true
}

// probeMedian is the median probe sample taken between from and to (0:
// none). The caller holds c.mu.
func (c *cpuClock) probeMedian(from, to time.Time) float64 {
	var v []float64
	for _, p := range c.probes {
		if !p.at.Before(from) && !p.at.After(to) {
			v = append(v, p.ms)
		}
	}
	if len(v) == 0 {
		return 0
	}
	return median(v)
}

// window is the machine's CPU between the samples nearest from and to.
func (c *cpuClock) window(from, to time.Time) (cpuWindow, bool) {
	if c == nil {
		return cpuWindow{}, false
	}
	c.sample() // a window that ends now has its end
	c.mu.Lock()
	defer c.mu.Unlock()
	nearest := func(t time.Time) cpuSample {
		best := c.samples[0]
		for _, s := range c.samples[1:] {
			if s.at.Sub(t).Abs() < best.at.Sub(t).Abs() {
				best = s
			}
		}
		return best
	}
	a, b := nearest(from), nearest(to)
	if b.total <= a.total {
		return cpuWindow{}, false
	}
	total := float64(b.total - a.total)
	cores := float64(b.total-a.total) / b.at.Sub(a.at).Seconds() / float64(clockTicks)
	return cpuWindow{
		BusyCores:  float64(b.busy-a.busy) / total * cores,
		StealShare: float64(b.steal-a.steal) / total,
		ProbeMs:    c.probeMedian(from, to),
	}, true
}

// describe renders the window for a note ("unknown" without samples).
func (c *cpuClock) describe(from, to time.Time) string {
	w, ok := c.window(from, to)
	if !ok {
		return "unknown"
	}
	return w.String()
}

// clockTicks is USER_HZ, 100 on every Linux architecture Go runs on.
const clockTicks = 100

// readCPU reads the aggregate "cpu" line: user nice system idle iowait irq
// softirq steal.
func readCPU() (cpuSample, bool) {
	data, err := os.ReadFile("/proc/stat")
	if err != nil {
		return cpuSample{}, false
	}
	line, _, _ := strings.Cut(string(data), "\n")
	f := strings.Fields(line)
	if len(f) < 9 || f[0] != "cpu" {
		return cpuSample{}, false
	}
	var v [8]uint64
	for i := range v {
		if v[i], err = strconv.ParseUint(f[i+1], 10, 64); err != nil {
			return cpuSample{}, false
		}
	}
	s := cpuSample{at: time.Now(), steal: v[7]}
	for i, x := range v {
		s.total += x
		if i != 3 && i != 4 && i != 7 { // idle, iowait, steal
			s.busy += x
		}
	}
	return s, true
}
