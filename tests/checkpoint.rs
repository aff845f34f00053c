//! Checkpoint files: complete-or-absent, HF names kept, pruning, finding the latest.

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use grpo::checkpoint::{self, Checkpoint, TrainerState};
use grpo::data::DataPosition;

fn save_step(dir: &std::path::Path, step: u64, limit: Option<usize>) -> std::path::PathBuf {
    let weight = Tensor::new(&[[step as f32, 2.0], [3.0, 4.0]], &Device::Cpu).unwrap();
    let model = vec![("model.embed_tokens.weight".to_string(), weight)];
    let optimizer: HashMap<String, Tensor> = [(
        "step".to_string(),
        Tensor::new(&[step as f32], &Device::Cpu).unwrap(),
    )]
    .into();
    let state = TrainerState {
        global_step: step,
        data: DataPosition {
            epoch: 0,
            index: 7 * step,
        },
        ..Default::default()
    };
    let config = dir.join("config.json");
    std::fs::write(&config, "{}").unwrap();
    let ckpt = Checkpoint {
        model: &model,
        adapter: None,
        optimizer: &optimizer,
        state: &state,
        model_files: &[config],
    };
    checkpoint::save(dir, &ckpt, limit).unwrap()
}

#[test]
fn saved_checkpoint_round_trips_state_weights_and_files() {
    let dir = tempfile::tempdir().unwrap();
    let path = save_step(dir.path(), 3, None);
    assert_eq!(path, dir.path().join("checkpoint-3"));
    assert!(path.join("config.json").is_file());
    let weights =
        candle_core::safetensors::load(path.join("model.safetensors"), &Device::Cpu).unwrap();
    let w = weights["model.embed_tokens.weight"]
        .to_vec2::<f32>()
        .unwrap();
    assert_eq!(w, [[3.0, 2.0], [3.0, 4.0]]);
    let (state, optimizer) = checkpoint::load_state(&path).unwrap();
    assert_eq!((state.global_step, state.data.index), (3, 21));
    assert_eq!(optimizer["step"].to_vec1::<f32>().unwrap(), [3.0]);
    assert!(std::fs::read_dir(dir.path())
        .unwrap()
        .all(|e| { !e.unwrap().file_name().to_string_lossy().ends_with(".tmp") }));
}

#[test]
fn half_written_checkpoints_are_never_taken_for_complete_ones() {
    let dir = tempfile::tempdir().unwrap();
    save_step(dir.path(), 2, None);
    // A crash mid-save leaves a temporary folder and maybe a folder without trainer_state.json.
    std::fs::create_dir_all(dir.path().join(".checkpoint-4.tmp")).unwrap();
    std::fs::create_dir_all(dir.path().join("checkpoint-5")).unwrap();
    assert_eq!(
        checkpoint::latest(dir.path()).unwrap(),
        dir.path().join("checkpoint-2")
    );
    let err = checkpoint::load_state(&dir.path().join("checkpoint-5")).unwrap_err();
    assert!(
        format!("{err:#}").contains("not a complete checkpoint"),
        "{err:#}"
    );
}

#[test]
fn save_total_limit_prunes_the_oldest() {
    let dir = tempfile::tempdir().unwrap();
    for step in [1, 2, 3, 4] {
        save_step(dir.path(), step, Some(2));
    }
    let steps: Vec<u64> = checkpoint::list(dir.path())
        .unwrap()
        .into_iter()
        .map(|(s, _)| s)
        .collect();
    assert_eq!(steps, [3, 4]);
}

#[test]
fn latest_in_an_empty_output_dir_says_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let err = checkpoint::latest(dir.path()).unwrap_err().to_string();
    assert!(
        err.contains("no complete checkpoint") && err.contains("resume_from_checkpoint"),
        "{err}"
    );
}
