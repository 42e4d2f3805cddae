//! Token-budget batching: texts sorted by length and packed so that a padded batch
//! (`rows x longest`) never exceeds a token budget. Compared with a fixed batch size,
//! short texts travel in large batches and long ones in small batches, the device does
//! the same amount of work per batch, and padding is small because neighbours in the
//! sorted order have nearly equal lengths.

/// One tokenised text, remembering where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenizedText {
    /// Position in the caller's input, to put results back in input order.
    pub index: usize,
    pub ids: Vec<u32>,
    /// The segment (token type) of each id, for models that tell the two texts of a pair
    /// apart (BERT's `token_type_ids`): empty when every token is in segment 0, as for a
    /// single text; otherwise one per id.
    pub type_ids: Vec<u32>,
}

impl TokenizedText {
    /// A single-segment text (every token of type 0).
    pub fn new(index: usize, ids: Vec<u32>) -> Self {
        Self {
            index,
            ids,
            type_ids: Vec::new(),
        }
    }
}

/// A batch ready for the device: rows of similar length, with their input positions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenBatch {
    pub rows: Vec<TokenizedText>,
}

impl TokenBatch {
    /// A batch of token-id rows in their given order: row `i` has index `i`.
    pub fn in_order(rows: impl IntoIterator<Item = Vec<u32>>) -> Self {
        TokenBatch {
            rows: rows
                .into_iter()
                .enumerate()
                .map(|(index, ids)| TokenizedText::new(index, ids))
                .collect(),
        }
    }

    /// The longest row: every row is padded to it.
    pub fn padded_len(&self) -> usize {
        self.rows.iter().map(|r| r.ids.len()).max().unwrap_or(0)
    }

    /// Tokens the device processes, padding included.
    pub fn padded_tokens(&self) -> usize {
        self.padded_len() * self.rows.len()
    }

    /// Real tokens, padding excluded.
    pub fn real_tokens(&self) -> usize {
        self.rows.iter().map(|r| r.ids.len()).sum()
    }
}

/// Packs tokenised texts into batches under a padded-token budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenBudgetBatcher {
    /// Most padded tokens (`rows x longest`) per batch.
    pub max_tokens: usize,
    /// Most rows per batch, whatever their length.
    pub max_rows: usize,
}

impl TokenBudgetBatcher {
    /// Splits `texts` into batches. Texts are ordered longest first (ties by input
    /// position, so the result is deterministic); a text longer than the budget still
    /// gets a batch of its own.
    pub fn batches(&self, mut texts: Vec<TokenizedText>) -> Vec<TokenBatch> {
        texts.sort_by(|a, b| b.ids.len().cmp(&a.ids.len()).then(a.index.cmp(&b.index)));
        let mut out = Vec::new();
        let mut current: Vec<TokenizedText> = Vec::new();
        let mut longest = 0;
        for t in texts {
            let len = t.ids.len().max(1);
            let new_longest = longest.max(len);
            let fits = (current.len() + 1) * new_longest <= self.max_tokens
                && current.len() < self.max_rows.max(1);
            if !current.is_empty() && !fits {
                out.push(TokenBatch {
                    rows: std::mem::take(&mut current),
                });
                longest = 0;
            }
            longest = longest.max(len);
            current.push(t);
        }
        if !current.is_empty() {
            out.push(TokenBatch { rows: current });
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(index: usize, len: usize) -> TokenizedText {
        TokenizedText::new(index, vec![7; len])
    }

    #[test]
    fn packs_by_padded_tokens_longest_first() {
        let b = TokenBudgetBatcher {
            max_tokens: 20,
            max_rows: 100,
        };
        // Lengths 3, 10, 4, 5, 9, 2: sorted 10, 9, 5, 4, 3, 2.
        let texts = [3, 10, 4, 5, 9, 2]
            .iter()
            .enumerate()
            .map(|(i, &l)| text(i, l))
            .collect();
        let batches = b.batches(texts);
        let lens: Vec<Vec<usize>> = batches
            .iter()
            .map(|b| b.rows.iter().map(|r| r.ids.len()).collect())
            .collect();
        // [10, 9] = 2 x 10 = 20 tokens; adding 5 would make 3 x 10 = 30 > 20.
        // [5, 4, 3, 2] = 4 x 5 = 20 tokens.
        assert_eq!(lens, vec![vec![10, 9], vec![5, 4, 3, 2]]);
        assert_eq!(batches[0].rows[0].index, 1);
        assert_eq!(batches[1].padded_tokens(), 20);
        assert_eq!(batches[1].real_tokens(), 14);
    }

    #[test]
    fn row_cap_and_oversized_text() {
        let b = TokenBudgetBatcher {
            max_tokens: 8,
            max_rows: 2,
        };
        let batches = b.batches(vec![text(0, 1), text(1, 1), text(2, 1), text(3, 50)]);
        let sizes: Vec<usize> = batches.iter().map(|b| b.rows.len()).collect();
        // The 50-token text exceeds the budget alone and still gets its own batch;
        // the three 1-token texts are split by the 2-row cap.
        assert_eq!(sizes, vec![1, 2, 1]);
        let mut all: Vec<usize> = batches
            .iter()
            .flat_map(|b| b.rows.iter().map(|r| r.index))
            .collect();
        all.sort();
        assert_eq!(all, vec![0, 1, 2, 3]);
    }

    #[test]
    fn equal_lengths_keep_input_order() {
        let b = TokenBudgetBatcher {
            max_tokens: 100,
            max_rows: 100,
        };
        let batches = b.batches(vec![text(2, 4), text(0, 4), text(1, 4)]);
        let order: Vec<usize> = batches[0].rows.iter().map(|r| r.index).collect();
        assert_eq!(order, vec![0, 1, 2]);
    }
}
