fn main() {
    eprintln!("slim: no commands yet");
}
