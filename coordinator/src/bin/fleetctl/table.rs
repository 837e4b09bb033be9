//! Aligned text columns and time stamps for the table output.

/// Columns separated by two spaces, each as wide as its widest cell. Empty cells print as `-`.
pub struct Table {
    headers: Vec<&'static str>,
    right_aligned: Vec<bool>,
    min_widths: Vec<usize>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(headers: &[&'static str]) -> Table {
        Table {
            headers: headers.to_vec(),
            right_aligned: vec![false; headers.len()],
            min_widths: vec![0; headers.len()],
            rows: Vec::new(),
        }
    }

    /// Aligns the named columns to the right, as suits numbers.
    pub fn right_align(mut self, headers: &[&str]) -> Table {
        for (index, header) in self.headers.iter().enumerate() {
            if headers.contains(header) {
                self.right_aligned[index] = true;
            }
        }
        self
    }

    /// Sets minimum widths in characters, for rows printed one at a time with [`Table::format_row`].
    pub fn min_widths(mut self, widths: &[usize]) -> Table {
        for (index, width) in widths.iter().enumerate().take(self.headers.len()) {
            self.min_widths[index] = *width;
        }
        self
    }

    pub fn push(&mut self, cells: Vec<String>) {
        debug_assert_eq!(cells.len(), self.headers.len(), "one cell per column");
        self.rows.push(cells);
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Formats the header and all rows, each line ending in a newline.
    pub fn render(&self) -> String {
        let widths = self.widths();
        let mut text = self.format_line(&widths, &self.header_cells());
        for row in &self.rows {
            text.push_str(&self.format_line(&widths, row));
        }
        text
    }

    /// Formats the header line alone, with the minimum widths.
    pub fn format_header(&self) -> String {
        self.format_line(&self.min_widths_or_headers(), &self.header_cells())
    }

    /// Formats one row with the minimum widths, so rows printed as they arrive line up while they fit.
    pub fn format_row(&self, cells: &[String]) -> String {
        self.format_line(&self.min_widths_or_headers(), cells)
    }

    fn header_cells(&self) -> Vec<String> {
        self.headers
            .iter()
            .map(|header| header.to_string())
            .collect()
    }

    fn min_widths_or_headers(&self) -> Vec<usize> {
        self.headers
            .iter()
            .zip(&self.min_widths)
            .map(|(header, min)| header.chars().count().max(*min))
            .collect()
    }

    fn widths(&self) -> Vec<usize> {
        let mut widths = self.min_widths_or_headers();
        for row in &self.rows {
            for (width, cell) in widths.iter_mut().zip(row) {
                *width = (*width).max(display_cell(cell).chars().count());
            }
        }
        widths
    }

    fn format_line(&self, widths: &[usize], cells: &[String]) -> String {
        let last = cells.len().saturating_sub(1);
        let mut line = String::new();
        for (index, cell) in cells.iter().enumerate() {
            let cell = display_cell(cell);
            let width = widths.get(index).copied().unwrap_or(0);
            let padding = width.saturating_sub(cell.chars().count());
            if index > 0 {
                line.push_str("  ");
            }
            if self.right_aligned.get(index).copied().unwrap_or(false) {
                line.push_str(&" ".repeat(padding));
                line.push_str(cell);
            } else {
                line.push_str(cell);
                // The last column is not padded, so lines carry no trailing spaces.
                if index != last {
                    line.push_str(&" ".repeat(padding));
                }
            }
        }
        line.push('\n');
        line
    }
}

fn display_cell(cell: &str) -> &str {
    if cell.is_empty() { "-" } else { cell }
}

/// Formats Unix milliseconds as UTC in RFC 3339 (`2025-03-01T12:00:05Z`), or `""` for 0, which the API
/// sends for "not set".
pub fn format_unix_ms(unix_ms: i64) -> String {
    if unix_ms <= 0 {
        return String::new();
    }
    let seconds = unix_ms.div_euclid(1000);
    let days = seconds.div_euclid(86_400);
    let second_of_day = seconds.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        second_of_day / 3600,
        second_of_day % 3600 / 60,
        second_of_day % 60
    )
}

/// Converts days since 1970-01-01 to a proleptic Gregorian date, with Howard Hinnant's `civil_from_days`
/// algorithm (<https://howardhinnant.github.io/date_algorithms.html>).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = (day_of_year - (153 * month_index + 2) / 5 + 1) as u32;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    } as u32;
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_aligns_columns() {
        let mut table = Table::new(&["NAME", "COUNT", "NOTE"]).right_align(&["COUNT"]);
        table.push(vec!["default".into(), "3".into(), "".into()]);
        table.push(vec!["gpu".into(), "12".into(), "paused".into()]);
        assert_eq!(
            table.render(),
            "NAME     COUNT  NOTE\n\
             default      3  -\n\
             gpu         12  paused\n"
        );
    }

    #[test]
    fn streamed_rows_use_min_widths() {
        let table = Table::new(&["SEQ", "KIND"]).min_widths(&[5]);
        assert_eq!(table.format_header(), "SEQ    KIND\n");
        assert_eq!(
            table.format_row(&["7".into(), "instance.launched".into()]),
            "7      instance.launched\n"
        );
    }

    #[test]
    fn unix_ms_as_rfc3339() {
        assert_eq!(format_unix_ms(0), "");
        assert_eq!(format_unix_ms(1), "1970-01-01T00:00:00Z");
        assert_eq!(format_unix_ms(951_782_400_000), "2000-02-29T00:00:00Z");
        assert_eq!(format_unix_ms(1_740_830_405_123), "2025-03-01T12:00:05Z");
        assert_eq!(format_unix_ms(4_102_444_799_000), "2099-12-31T23:59:59Z");
    }
}
