package shadow

import (
	"encoding/json"
	"time"

	"github.com/shadowctl/shadowctl/internal/window"
)

// addDaemon fills the status fields added for the daemon.
func (s *Status) addDaemon(m *Migration, now time.Time) {
	// A stale reason (the copy stopped while it waited) is not shown.
	if m.Throttled != "" && m.Phase == Copying && !m.Paused {
		t := m.Throttled
		s.Throttled = &t
	}
	if len(m.Driver) > 0 && string(m.Driver) != "null" {
		var d DriverInfo
		if json.Unmarshal(m.Driver, &d) == nil {
			s.Driver = &d
		}
	}
	req := m.Request
	s.BatchSize, s.MaxRowsPerSecond, s.Workers = req.BatchSize, req.MaxRowsPerSecond, req.Workers
	s.CutoverPolicy, s.CutoverHeld, s.AutoRollback = req.CutoverPolicy, m.CutoverHeld, req.AutoRollback
	if s.CutoverPolicy == "" {
		s.CutoverPolicy = CutoverManual
	}
	// Trigger sync is synchronous: green is current at every commit (the
	// logical sync's lag is added by Store.Status).
	if req.Window != "" {
		w := req.Window
		s.CutoverWindow = &w
		if win, err := window.Parse(req.Window); err == nil {
			if start, end, open := win.Next(now); !start.IsZero() {
				s.NextWindow = &WindowStatus{Start: start, End: end, Open: open}
			}
		}
	}
}
