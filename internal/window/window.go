// Package window parses cutover windows ("Sat,Sun 02:00-04:00 Europe/Berlin")
// and computes, from an injected clock, whether a time is inside one and when
// the next one starts and ends. It knows nothing about migrations.
//
// Grammar (case-insensitive, fields separated by spaces):
//
//	window = [days] range [zone]
//	days   = day ("," day)*          ; day = Mon|Tue|Wed|Thu|Fri|Sat|Sun, or a span Mon-Fri
//	range  = HH:MM "-" HH:MM         ; 24-hour clock; end before start crosses midnight
//	zone   = an IANA name (Europe/Berlin) or UTC; default UTC
//
// Days name the day on which a window starts: "Sat 23:00-01:00" runs from
// Saturday 23:00 to Sunday 01:00. Without days, every day has a window. A
// range whose start equals its end is 24 hours long. Times are wall-clock
// times in the zone: on a daylight-saving change a window follows the
// zone's clock (a start inside a skipped hour begins at the shifted time).
package window

import (
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"
)

// ErrBadWindow means a window specification does not follow the grammar.
var ErrBadWindow = errors.New("bad cutover window")

// Clock tells the time; tests inject a fake one.
type Clock interface{ Now() time.Time }

// SystemClock is the real clock.
type SystemClock struct{}

// Now returns time.Now().
func (SystemClock) Now() time.Time { return time.Now() }

// Window is a parsed specification.
type Window struct {
	Spec  string
	Days  [7]bool // indexed by time.Weekday; all true when no days were given
	Start time.Duration
	End   time.Duration
	Loc   *time.Location
}

var dayNames = map[string]time.Weekday{
	"sun": time.Sunday, "mon": time.Monday, "tue": time.Tuesday, "wed": time.Wednesday,
	"thu": time.Thursday, "fri": time.Friday, "sat": time.Saturday,
}

// Parse reads a window specification.
func Parse(spec string) (*Window, error) {
	fields := strings.Fields(spec)
	bad := func(format string, a ...any) (*Window, error) {
		return nil, fmt.Errorf("%w %q: %s (write e.g. \"Sat,Sun 02:00-04:00 Europe/Berlin\")", ErrBadWindow, spec, fmt.Sprintf(format, a...))
	}
	if len(fields) == 0 || len(fields) > 3 {
		return bad("expected [days] HH:MM-HH:MM [zone]")
	}
	w := &Window{Spec: strings.Join(fields, " "), Loc: time.UTC}
	i := 0
	if !strings.Contains(fields[0], ":") {
		for _, part := range strings.Split(fields[0], ",") {
			from, to, isSpan := strings.Cut(strings.ToLower(part), "-")
			d1, ok := dayNames[from]
			if !ok {
				return bad("unknown day %q", part)
			}
			d2 := d1
			if isSpan {
				if d2, ok = dayNames[to]; !ok {
					return bad("unknown day %q", part)
				}
			}
			for d := d1; ; d = (d + 1) % 7 {
				w.Days[d] = true
				if d == d2 {
					break
				}
			}
		}
		i++
	} else {
		for d := range w.Days {
			w.Days[d] = true
		}
	}
	if i >= len(fields) {
		return bad("missing the time range")
	}
	from, to, ok := strings.Cut(fields[i], "-")
	if !ok {
		return bad("time range %q: write HH:MM-HH:MM", fields[i])
	}
	var err error
	if w.Start, err = clockTime(from); err != nil {
		return bad("%v", err)
	}
	if w.End, err = clockTime(to); err != nil {
		return bad("%v", err)
	}
	i++
	if i < len(fields) {
		if w.Loc, err = time.LoadLocation(fields[i]); err != nil {
			return bad("unknown time zone %q (use an IANA name such as Europe/Berlin)", fields[i])
		}
		i++
	}
	if i != len(fields) {
		return bad("unexpected %q", fields[i])
	}
	return w, nil
}

func clockTime(s string) (time.Duration, error) {
	h, m, ok := strings.Cut(s, ":")
	hh, err1 := strconv.Atoi(h)
	mm, err2 := strconv.Atoi(m)
	if !ok || err1 != nil || err2 != nil || hh < 0 || hh > 24 || mm < 0 || mm > 59 || (hh == 24 && mm != 0) || len(m) != 2 {
		return 0, fmt.Errorf("time %q: write HH:MM (00:00-24:00)", s)
	}
	return time.Duration(hh)*time.Hour + time.Duration(mm)*time.Minute, nil
}

func (w *Window) length() time.Duration {
	l := w.End - w.Start
	if l <= 0 {
		l += 24 * time.Hour
	}
	return l
}

// occurrence returns the window starting on the calendar day of day (in
// w.Loc), and whether the window runs that day.
func (w *Window) occurrence(day time.Time) (start, end time.Time, ok bool) {
	y, mo, d := day.Date()
	h, m := int(w.Start/time.Hour), int(w.Start%time.Hour/time.Minute)
	start = time.Date(y, mo, d, h, m, 0, 0, w.Loc)
	end = start.Add(w.length())
	eh, em := int(w.End/time.Hour), int(w.End%time.Hour/time.Minute)
	// Wall-clock end on the end's calendar day (follows DST changes).
	ey, emo, ed := end.Date()
	if wall := time.Date(ey, emo, ed, eh, em, 0, 0, w.Loc); wall.After(start) && w.End != w.Start {
		end = wall
	}
	return start, end, w.Days[start.Weekday()]
}

// Next returns the window that contains now (open true), or else the next one
// to start.
func (w *Window) Next(now time.Time) (start, end time.Time, open bool) {
	local := now.In(w.Loc)
	// A window that started yesterday may still be open.
	for off := -1; off <= 8; off++ {
		s, e, ok := w.occurrence(local.AddDate(0, 0, off))
		if !ok {
			continue
		}
		if !now.Before(s) && now.Before(e) {
			return s, e, true
		}
		if s.After(now) {
			return s, e, false
		}
	}
	return time.Time{}, time.Time{}, false
}

// String returns the normalised specification.
func (w *Window) String() string { return w.Spec }
