package main

import (
	"context"
	"fmt"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"
)

// cpuClock samples the machine's CPU counters (/proc/stat) through the run,
// so that each measured window can say how busy the machine was and how much
// of its time the hypervisor gave to other guests (steal). The ratios divide
// windows taken seconds to minutes apart; when a neighbour's load moves
// between them, the steal of each window shows it.
type cpuClock struct {
	mu      sync.Mutex
	samples []cpuSample
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
}

func (w cpuWindow) String() string {
	return fmt.Sprintf("%.2f cores busy, steal %.0f %%", w.BusyCores, 100*w.StealShare)
}

// startCPUClock samples every 250 ms until ctx ends; nil where /proc/stat
// cannot be read.
func startCPUClock(ctx context.Context) *cpuClock {
	if _, ok := readCPU(); !ok {
		return nil
	}
	c := &cpuClock{}
	c.sample()
	go func() {
		t := time.NewTicker(250 * time.Millisecond)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
				c.sample()
			}
		}
	}()
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
